"""mergekit's YAML, as it is: translated into a forgetless recipe (:mod:`.recipe` calls :func:`translate`).

A mapping with ``merge_method`` (or with mergekit's other top-level keys and no ``method``) is a mergekit config.
What maps, checked against mergekit 0.1.5's ``merge_methods/`` (``generalized_task_arithmetic.py``, ``linear.py``,
``registry.py``), ``sparsify.py``, ``config.py`` and ``plan.py``:

- ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``: θ₀ + λ·Σ wₖ·Δₖ over the models other than
  ``base_model`` (listing the base among ``models`` is allowed: mergekit skips it), after TIES's magnitude trim or
  DARE's Bernoulli drop, with TIES's sign election and disjoint mean. ``weight`` is required per model (a model's
  ``parameters`` or the top-level ones), ``density`` defaults to 1 (mergekit's default, not forgetless's 0.5),
  ``lambda`` to 1. mergekit's ``normalize`` (dividing by the summed weights) maps where forgetless has the same
  rule: TIES's disjoint mean is ``normalize: true``, DARE-TIES takes ``normalize: false`` (the agreeing entries
  added); task arithmetic and DARE-linear with ``normalize: true`` become weights wₖ/Σw. DARE's ``rescale``
  (mergekit's default: true) is its L1 rescale, ``rescale: l1`` in forgetless (the kept entries scaled to the
  task vector's L1 norm); its masks are drawn from other generators than mergekit's. ``int8_mask`` changes only the dtype of mergekit's sign mask, never a value: accepted.
  The sums are taken in mergekit's order of operations (``convention: mergekit``), so task arithmetic is mergekit's
  result bit for bit (up to four models), and TIES too, up to which of equal |Δ| at the top-k boundary are kept.
- ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear`` (``sparsify.py``'s ``magnitude_outliers``
  and ``della_magprune``): as above, each Δₖ sparsified by forgetless's methods of the same names, with ``gamma``
  (0.01) or ``epsilon`` (0.15) per model, mergekit's ``rescale`` (an L1 rescale, which they have) and
  ``normalize: false`` (the TIES variants then add the agreeing entries), and Breadcrumbs' ``mergekit_slice``
  (mergekit's ``[n_bot:-n_top]`` keeps nothing when ⌊γ·n⌋ = 0). Breadcrumbs is bit for bit up to the order of
  equal |Δ|; DELLA's masks are drawn from other generators than mergekit's.
- ``linear``: the weighted average Σ wₖθₖ / Σ wₖ of the listed models (and of ``base_model`` when it is not
  listed, as mergekit adds it), forgetless's ``linear`` at λ = 1.
- ``slerp`` (``slerp.py``): ``base_model`` (t = 0) and exactly one other model (t = 1); ``t`` is required, a
  number, a gradient or a filtered list (per tensor, as below). ``model_stock`` (``model_stock.py``):
  ``base_model`` and two or more other models, ``filter_wise`` (default false). Neither takes per-model
  parameters. forgetless's ``slerp`` and ``model_stock`` are mergekit's rules; their angles are summed in float64
  (mergekit's in float32), so the results agree to float32 rounding.
- per-tensor values of ``weight``, ``density``, ``lambda``, ``gamma``, ``epsilon`` (``ConfigReader.parameter`` and ``evaluate_setting``
  in ``config.py``, ``t`` from ``plan.py``) become forgetless values per part (:mod:`.engine.parts`), the first
  entry that selects a tensor giving its value. A tensor's value is the model's own setting, else the top-level
  one, else the default. A filtered list ``[{filter: self_attn, value: 0.5}, {value: 1.0}]`` takes the first entry
  whose ``filter`` is a substring of the tensor's name (none or ``*``: every tensor): each becomes the selector
  ``re:<the filter, escaped>``. A gradient (a list of numbers ``g``) is interpolated at ``t``, the decoder layer's
  index over the layers' count less one (1 for one layer) and 0 for the tensors outside the decoder layers:
  ``(1 − f)·g[i] + f·g[i + 1]`` with ``i + f = t·(len(g) − 1)``, each run of layers of one value one entry
  ``language.layers[a:b]`` (a filtered gradient: ``re:`` selectors of the layers' names that hold the filter).
  The values are mergekit's bit for bit; gradients over a model with a vision tower are refused (mergekit
  interpolates over each module's own layers).
- ``dtype`` is mergekit's compute dtype: forgetless computes in float32 whatever it says, and writes
  ``out_dtype``, else ``dtype``, else the base's dtype. ``tokenizer_source: base`` (or absent): the base's
  tokenizer files are copied, as forgetless always does.

Everything else is refused, in one line naming the key and what to do: other merge methods, ``slices`` and
``modules``, tokenizer unions and ``tokenizer:``, ``chat_template``, per-tensor values of ``normalize``,
``rescale`` and ``int8_mask``, per-tensor weights with ``normalize`` dividing by their sum (task arithmetic,
DARE-linear) or, for ``linear``, not dividing, Hub revisions, TIES's ``rescale`` and ``normalize: false``,
``normalize`` values whose rule forgetless does not have, and keys mergekit's method does not take.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import layout as layouts
from .errors import ForgetlessError

MERGEKIT_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
MAPPED = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "model_stock",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
INTERPOLATIONS = {"slerp": ("t",), "model_stock": ("filter_wise",)}  # their parameters: top-level only
GTA = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
# mergekit 0.1.5's defaults (registry.py): normalize and rescale per method
NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False}
RESCALE = {"task_arithmetic": False, "ties": False, "dare_linear": True, "dare_ties": True}
# Breadcrumbs and DELLA (sparsify.py's magnitude_outliers, della_magprune): their defaults, and their per-model
# parameter with mergekit's default; `rescale` is an L1 rescale, which forgetless's methods also have
NORMALIZE |= {"breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": False}
RESCALE |= {"breadcrumbs": False, "breadcrumbs_ties": False, "della": True, "della_linear": True}
SPARSIFY = {"breadcrumbs": ("gamma", 0.01), "breadcrumbs_ties": ("gamma", 0.01)}
SPARSIFY |= {"della": ("epsilon", 0.15), "della_linear": ("epsilon", 0.15)}
PER_TENSOR = (
    "weight",
    "density",
    "lambda",
    "t",
    "gamma",
    "epsilon",
)  # the parameters mergekit may give per tensor that forgetless maps
DTYPES = ("float32", "bfloat16", "float16")
HINT = "see docs/mergekit.md"
UNSUPPORTED = (  # (key, why forgetless refuses it, what to do)
    (
        "slices",
        (
            "layer slices (frankenmerges) are not merges of matching tensors (one slice taking every layer "
            "of each source is read as `models:`)"
        ),
        "merge whole models with `models:`; use a forgetless recipe's scope: to merge some layers only",
    ),
    ("modules", "per-module configs are not read", "use one `models:` list for the whole model"),
    (
        "tokenizer",
        "forgetless copies the base's tokenizer and never changes the vocabulary",
        "remove it (tokenizer_source: base is what forgetless does)",
    ),
    (
        "chat_template",
        "forgetless copies the base's tokenizer files, chat template included",
        "remove it, and set the template in the output's tokenizer_config.json afterwards",
    ),
)


def is_mergekit(data: dict) -> bool:
    """A mergekit config: it names ``merge_method``, or has mergekit's keys and no forgetless ``method``."""
    return "merge_method" in data or (
        "method" not in data
        and any(k in data for k in MERGEKIT_KEYS if k not in ("models", "parameters", "dtype"))
    )


@dataclass
class _Config:
    """A mergekit config being read: its method, top-level parameters and where it came from (for errors)."""

    data: dict
    where: str
    method: str = ""
    top: dict = field(default_factory=dict)
    layers: Any = None  # the base's layout and tensor names, read for values per tensor

    @property
    def base_ref(self) -> str | None:
        """The model whose decoder layers a gradient runs over: the base, else (linear) the first model."""
        base = self.data.get("base_model")
        models = self.data.get("models") or [{}]
        return base if base is not None else models[0].get("model")

    def refuse(self, key: str, problem: str, remedy: str = HINT) -> ForgetlessError:
        return ForgetlessError(f"{key}: {problem}", file=self.where, remedy=remedy)

    def value(self, i: int, params: dict, key: str, default: Any = None) -> Any:
        """Model ``i``'s parameter: its own, else the top-level one, else ``default``; required when neither (for
        some tensor: filters that leave it out). One value, or forgetless entries per part."""
        v = per_tensor(self, [params.get(key), self.top.get(key)], default)
        if v is None:
            raise self.refuse(
                f"models[{i}].parameters.{key}",
                f"mergekit's {self.method} requires it"
                + (" (for the tensors no filter selects)" if key in params or key in self.top else ""),
                f"give it per model or under parameters: (e.g. {key}: 1.0)",
            )
        return v

    @property
    def per_model_keys(self) -> tuple[str, ...]:
        if self.method in INTERPOLATIONS:
            return ()
        if self.method in SPARSIFY:
            return ("weight", "density", SPARSIFY[self.method][0])
        return ("weight",) if self.method == "linear" else ("weight", "density")

    @property
    def global_keys(self) -> tuple[str, ...]:
        if self.method in INTERPOLATIONS:
            return INTERPOLATIONS[self.method]
        return ("normalize",) if self.method == "linear" else ("normalize", "rescale", "int8_mask", "lambda")


def translate(data: dict, where: str) -> dict:
    """The forgetless recipe (a plain mapping) that computes what the mergekit config `data` does; a
    :class:`ForgetlessError` naming the key when it uses something forgetless does not have."""
    cfg = _Config(_whole_slices(data, where), where)
    _check_keys(cfg)
    base = data.get("base_model")
    if base is not None:
        base = _reference(base, "base_model", cfg.refuse)
    _check_tokenizer(cfg, base)
    dtype = _dtype(data, cfg.refuse)
    _check_top_parameters(cfg)
    entries = _entries(cfg)
    if cfg.method in INTERPOLATIONS:
        return _interpolation(entries, base, cfg, dtype)
    normalize = cfg.top.get("normalize", NORMALIZE[cfg.method])
    if cfg.method == "linear":
        return _linear(entries, base, cfg, normalize, dtype)
    return _task_vectors(entries, base, cfg, normalize, dtype)


def _whole_slices(data: dict, where: str) -> dict:
    """A config whose one slice takes every decoder layer of each source (``slices: [{sources: [{model,
    layer_range: [0, L]}, …]}]``, how slerp configs are usually written) as the same config with ``models:`` —
    the same merge; any other ``slices`` is left for :data:`UNSUPPORTED` to refuse."""
    slices = data.get("slices")
    if not isinstance(slices, list) or len(slices) != 1 or "models" in data:
        return data
    sources = slices[0].get("sources") if isinstance(slices[0], dict) else None
    if not isinstance(sources, list) or not sources or set(slices[0]) != {"sources"}:
        return data
    if any(not isinstance(s, dict) or set(s) - {"model", "layer_range", "parameters"} for s in sources):
        return data
    cfg = _Config({**data, "models": [{"model": s.get("model")} for s in sources]}, where)
    layers = _layout(cfg)[0].num_layers
    if any(s.get("layer_range") != [0, layers] for s in sources):
        return data
    models = [{k: v for k, v in s.items() if k != "layer_range"} for s in sources]
    return {**{k: v for k, v in data.items() if k != "slices"}, "models": models}


def _check_keys(cfg: _Config) -> None:
    """One dialect per file, mergekit's keys only, a method forgetless runs, nothing it cannot honour."""
    data, refuse = cfg.data, cfg.refuse
    if "method" in data:
        raise refuse(
            "merge_method",
            "a recipe names either `method` (forgetless) or `merge_method` (mergekit)",
            "keep one dialect per file",
        )
    for key in data:
        if key not in MERGEKIT_KEYS:
            raise refuse(
                key,
                "not a key of a mergekit config forgetless reads",
                f"remove it (mergekit keys read: {', '.join(MERGEKIT_KEYS)}); --out and --memory are "
                "command-line options",
            )
    method = data.get("merge_method")
    if method is None:
        raise refuse("merge_method", "required key is missing")
    if method not in MAPPED:
        raise refuse(
            "merge_method",
            f"{method!r} is not in forgetless",
            f"forgetless runs mergekit's "
            f"{', '.join(MAPPED)}; `forgetless methods` lists its own (write a forgetless recipe)",
        )
    cfg.method = method
    for key, why, remedy in UNSUPPORTED:
        if data.get(key) is not None:
            raise refuse(key, why, remedy)


def _check_tokenizer(cfg: _Config, base: str | None) -> None:
    source = cfg.data.get("tokenizer_source")
    if source is not None and source not in ("base", base):
        raise cfg.refuse(
            "tokenizer_source",
            f"{source!r}: forgetless copies the base's tokenizer and never builds another vocabulary",
            "merge models that share the base's tokenizer, with tokenizer_source: base",
        )


def _check_top_parameters(cfg: _Config) -> None:
    top = cfg.data.get("parameters") or {}
    if not isinstance(top, dict):
        raise cfg.refuse("parameters", "must be a mapping")
    allowed = cfg.per_model_keys + cfg.global_keys
    for k, v in top.items():
        if k not in allowed:
            raise cfg.refuse(
                f"parameters.{k}",
                f"not a parameter of mergekit's {cfg.method}",
                f"remove it (mergekit ignores it; {cfg.method} takes {', '.join(allowed)})",
            )
        _setting(v, f"parameters.{k}", cfg.refuse, k in PER_TENSOR)
    cfg.top = top


def _entries(cfg: _Config) -> list[tuple[int, str, dict]]:
    """(index, model reference, its per-model parameters) of every entry of ``models:``, checked."""
    models, refuse = cfg.data.get("models"), cfg.refuse
    if not isinstance(models, list) or not models:
        raise refuse("models", "a list of models is required")
    entries = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise refuse(f"models[{i}]", "each entry is a mapping with `model:` (and optional `parameters:`)")
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise refuse(f"models[{i}].{extra[0]}", "not a key of a mergekit model entry", "remove it")
        ref = _reference(m["model"], f"models[{i}].model", refuse)
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise refuse(f"models[{i}].parameters", "must be a mapping")
        for k, v in params.items():
            if k not in cfg.per_model_keys:
                raise refuse(
                    f"models[{i}].parameters.{k}",
                    f"not a per-model parameter of mergekit's {cfg.method}",
                    f"remove it (mergekit ignores it; per model {cfg.method} takes "
                    f"{', '.join(cfg.per_model_keys) or 'nothing'})",
                )
            _setting(v, f"models[{i}].parameters.{k}", refuse, k in PER_TENSOR)
        entries.append((i, ref, params))
    return entries


def _task_vectors(entries: list, base: str | None, cfg: _Config, normalize: bool, dtype: str) -> dict:
    """task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties), della(_linear): θ₀ + λ·Σ wₖ·Δₖ over the
    models other than the base."""
    method, refuse = cfg.method, cfg.refuse
    if base is None:
        raise refuse("base_model", f"mergekit's {method} takes task vectors from it: required")
    tasks = [(i, ref, params) for i, ref, params in entries if ref != base]  # mergekit skips the base's entry
    if not tasks:
        raise refuse(
            "models", "only the base model is listed: nothing to merge", "list the fine-tuned models"
        )
    weights = [_values(cfg.value(i, p, "weight"), float) for i, _, p in tasks]
    densities = [  # mergekit: ≥ 1 keeps all
        _values(cfg.value(i, p, "density", 1.0), lambda d: min(d, 1.0)) for i, _, p in tasks
    ]
    params: dict[str, Any] = {
        "lambda": per_tensor(cfg, [cfg.top.get("lambda")], 1.0),
        "convention": "mergekit",
    }
    weights = _normalized(cfg, normalize, weights)
    rescale = _rescale(cfg)
    if rescale is not None:
        params["rescale"] = rescale
    params.update(_sparsify_params(cfg, normalize))
    out_models = []
    for (i, ref, p), w, d in zip(tasks, weights, densities):
        entry = {"model": ref, "weight": w}
        if method != "task_arithmetic":
            entry["density"] = d
        if method in SPARSIFY:  # gamma (Breadcrumbs) or epsilon (DELLA), with mergekit's default
            key, default = SPARSIFY[method]
            entry[key] = _values(cfg.value(i, p, key, default), float)
        out_models.append(entry)
    return {"method": method, "base": base, "models": out_models, "parameters": params, "dtype": dtype}


def _normalized(cfg: _Config, normalize: bool, weights: list[float]) -> list[float]:
    """mergekit's ``normalize`` where forgetless has the same rule: TIES's disjoint mean is normalize: true; task
    arithmetic and DARE-linear with it become weights wₖ/Σw."""
    method = cfg.method
    if method == "ties" and not normalize:  # the other TIES variants take `normalize: false`
        raise cfg.refuse(
            "parameters.normalize",
            "false: mergekit then adds the agreeing entries without "
            "dividing; forgetless's ties always divides by the agreeing models' summed weights "
            "(normalize: true)",
            "set normalize: true to merge as forgetless does",
        )
    if method in ("task_arithmetic", "dare_linear", "breadcrumbs", "della_linear") and normalize:
        if any(isinstance(w, list) for w in weights):
            raise cfg.refuse(
                "parameters.normalize",
                "true with weights per tensor: mergekit divides each tensor's weights by their sum, "
                "forgetless's weights are not normalised per tensor",
                "set normalize: false with weights you normalised, or give one weight per model",
            )
        total = sum(weights)
        if abs(total) >= 1e-8:  # mergekit leaves a (near) zero divisor at 1
            return [w / total for w in weights]
    return weights


def _rescale(cfg: _Config) -> bool | str | None:
    """``rescale`` as forgetless takes it (None: the method has none): DARE's, Breadcrumbs' and DELLA's L1 rescale
    is mergekit's; TIES's refused (forgetless's ties has none)."""
    method, rescale = cfg.method, cfg.top.get("rescale", RESCALE[cfg.method])
    if method == "ties" and rescale:
        raise cfg.refuse(
            "parameters.rescale",
            "true: mergekit rescales the trimmed task vector to its L1 norm; "
            "forgetless's ties does not rescale",
            "remove it (mergekit's default for ties is false)",
        )
    if method in SPARSIFY:  # forgetless's have mergekit's L1 rescale (della's own default is 1/p)
        return ("l1" if rescale else "none") if method.startswith("della") else bool(rescale)
    if not method.startswith("dare"):
        return None
    return "l1" if rescale else False


def _sparsify_params(cfg: _Config, normalize: bool) -> dict[str, Any]:
    """The sparsified methods' settings that follow mergekit: Breadcrumbs' slice (a tensor with ⌊γ·n⌋ = 0 loses
    every entry), and ``normalize: false`` (the agreeing entries added, not averaged) for the TIES variants."""
    out: dict[str, Any] = {"mergekit_slice": True} if cfg.method.startswith("breadcrumbs") else {}
    if cfg.method in ("breadcrumbs_ties", "della", "dare_ties") and not normalize:
        out["normalize"] = False
    return out


def _linear(entries: list, base: str | None, cfg: _Config, normalize: bool, dtype: str) -> dict:
    """mergekit's linear: Σ wₖθₖ / Σ wₖ over every listed model, and the base when it is not listed (mergekit
    adds it, with the top-level weight)."""
    models = [{"model": ref, "weight": _values(cfg.value(i, p, "weight"), float)} for i, ref, p in entries]
    if base is not None and all(m["model"] != base for m in models):
        top = per_tensor(cfg, [cfg.top.get("weight")], None)
        if top is None:
            raise cfg.refuse(
                "base_model",
                "not among models: mergekit's linear averages it in, and needs a weight for it",
                "list it under models with its weight, or drop base_model",
            )
        models.append({"model": base, "weight": _values(top, float)})
    if not normalize and any(isinstance(m["weight"], list) for m in models):
        raise cfg.refuse(
            "parameters.normalize",
            "false with weights per tensor: forgetless's linear is the weighted average",
            "set normalize: true",
        )
    total = sum(m["weight"] for m in models if not isinstance(m["weight"], list))
    if not normalize and not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-12):
        raise cfg.refuse(
            "parameters.normalize",
            f"false with weights summing to {total:g}: forgetless's linear is the weighted average",
            "set normalize: true (or weights summing to 1)",
        )
    return {
        "method": "linear",
        "base": base if base is not None else models[0]["model"],
        "models": models,
        "parameters": {"lambda": 1.0},
        "dtype": dtype,
    }


def _interpolation(entries: list, base: str | None, cfg: _Config, dtype: str) -> dict:
    """slerp: from ``base_model`` to the one other model, ``t`` per tensor; model_stock: ``base_model`` and two or
    more others, ``filter_wise``. A model listed twice counts once, as mergekit gathers one tensor per model."""
    method, refuse = cfg.method, cfg.refuse
    if base is None:
        raise refuse("base_model", f"mergekit's {method} interpolates from it: required")
    others = list(dict.fromkeys(ref for _, ref, _ in entries if ref != base))  # the base: listed or not
    want = 1 if method == "slerp" else 2
    if len(others) < want or (method == "slerp" and len(others) > 1):
        count = "exactly one other model" if method == "slerp" else "two or more other models"
        raise refuse(
            "models",
            f"mergekit's {method} merges base_model and {count}, got {len(others)}",
            f"list {count} besides base_model",
        )
    if method == "slerp":
        t = per_tensor(cfg, [cfg.top.get("t")], None)
        if t is None:
            some = " (for the tensors no filter selects)" if "t" in cfg.top else ""
            raise refuse("parameters.t", f"mergekit's slerp requires it{some}", "give it (e.g. t: 0.5)")
        params = {"t": t}
    else:
        params = {"filter_wise": bool(cfg.top.get("filter_wise", False))}  # mergekit tests its truth
    models = [{"model": ref} for ref in others]
    return {"method": method, "base": base, "models": models, "parameters": params, "dtype": dtype}


def _reference(v: Any, key: str, refuse) -> str:
    """A model reference as forgetless reads it: a local folder, or ``DIR+ADAPTER`` (mergekit's ``model+lora``)."""
    if not isinstance(v, str):
        raise refuse(key, "give the model as a string (a folder, or FOLDER+LORA_ADAPTER)")
    if "@" in v:
        raise refuse(
            key,
            f"{v!r} names a Hub revision: forgetless reads local folders",
            "download that revision (huggingface-cli download REPO --revision REV --local-dir DIR) "
            "and give the folder",
        )
    return v


def _scalar(v: Any, key: str, refuse) -> None:
    if not isinstance(v, (int, float, bool)):
        raise refuse(key, f"{v!r} is not a number or true/false")


def _setting(v: Any, key: str, refuse, per_tensor_ok: bool) -> None:
    """Refuse what mergekit would not read as a setting (a number, a gradient, a filtered list of them), and a
    setting per tensor of a parameter forgetless takes once."""
    if not isinstance(v, (list, dict)):
        return _scalar(v, key, refuse)
    if not per_tensor_ok:
        raise refuse(
            key,
            "a per-layer gradient or a filtered value: forgetless takes one value of it",
            "give one value (per-tensor values map for weight, density and lambda)",
        )
    if isinstance(v, dict):
        raise refuse(key, "a filtered value is a list of {filter, value} entries", "write it as a list")
    if _is_gradient(v):
        return None
    for j, c in enumerate(v):
        if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
            raise refuse(
                f"{key}[{j}]",
                "a per-layer gradient is a list of numbers, a filtered value a list of {filter, value}",
                "give numbers only, or {filter: NAME_PART, value: V} entries",
            )
        if not isinstance(c.get("filter"), (str, type(None))):
            raise refuse(f"{key}[{j}].filter", "a filter is a part of tensor names (a string)")
        value = c["value"]
        if not (isinstance(value, list) and _is_gradient(value)):
            _scalar(value, f"{key}[{j}].value", refuse)
    return None


def _is_gradient(v: list) -> bool:
    """A list of numbers: mergekit interpolates it over the layers."""
    return bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


# ------------------------------------------------------------------------------------------- per-tensor values
def per_tensor(cfg: _Config, settings: list, default: Any) -> Any:
    """One parameter as mergekit evaluates it per tensor (``ConfigReader.parameter``): the first of `settings`
    (the model's own, then the top-level one) that gives the tensor a value, else `default`. One value, or the
    forgetless entries per part (ending in the default); None when some tensor gets no value and there is no
    default."""
    entries: list[dict] = []
    for setting in settings:
        if setting is None:
            continue
        conditions = (
            setting if isinstance(setting, list) and not _is_gradient(setting) else [{"value": setting}]
        )
        for c in conditions:
            everywhere = c.get("filter") in (None, "*", "")  # mergekit: no filter, "*", or "" in any name
            value = c["value"]
            entries += _entries_of(cfg, value, None if everywhere else c["filter"])
            if everywhere:
                return _ending(entries, evaluate(value, 0.0))
    return None if entries and default is None else _ending(entries, default)


def _ending(entries: list[dict], default: Any) -> Any:
    return [*entries, {"value": default}] if entries else default


def evaluate(setting: Any, t: float) -> Any:
    """mergekit's ``evaluate_setting`` of a number or gradient at `t`: a gradient ``g`` linearly interpolated at
    position t·(len(g) − 1), in mergekit's order of operations (its values are floats, as its config reads them)."""
    if not isinstance(setting, list):
        return setting
    g = [float(x) for x in setting]
    scaled = t * (len(g) - 1)
    i0 = int(scaled)
    i1 = min(len(g) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * g[i0] + frac * g[i1]


def layer_t(layer: int, num_layers: int) -> float:
    """mergekit's ``t`` of a decoder layer (``plan.py``): its index over the layers' count less one; 1 alone."""
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _entries_of(cfg: _Config, value: Any, substring: str | None) -> list[dict]:
    """The entries for one value of a filter (`substring`; None: every tensor) before the default: a number's one
    entry (none without a filter: it is the default), a gradient's runs of layers of one value, then (filtered)
    its value at t = 0 for the tensors outside the decoder layers. Entries that would select no tensor of the base
    are left out, as mergekit passes over a filter no name holds."""
    if substring is None and not isinstance(value, list):
        return []  # one value for every tensor: the default
    layout, names = _layout(cfg)
    holds = [n for n in names if substring is None or substring in n]
    escaped = None if substring is None else re.escape(substring)
    gradient = isinstance(value, list)
    takers = [n for n in holds if not gradient or layouts.layer_of(layout, n) is None]  # t = 0 there
    tail = [{"scope": f"re:{escaped}", "value": evaluate(value, 0.0)}] if escaped and takers else []
    if not gradient:
        return tail
    _refuse_vision(cfg, layout, names)
    layers = {layouts.layer_of(layout, n) for n in holds}
    values = [evaluate(value, layer_t(i, layout.num_layers)) for i in range(layout.num_layers)]
    runs: list[list] = []
    for i, v in enumerate(values):
        if i not in layers:
            continue
        if runs and runs[-1][2] == v and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, v])
    return [{"scope": _layers_scope(layout, a, b, escaped), "value": v} for a, b, v in runs] + tail


def _layers_scope(layout: Any, a: int, b: int, escaped: str | None) -> str:
    """The selector of decoder layers a:b, and (`escaped`) of their tensors whose names hold that regex."""
    if escaped is None:
        return f"language.layers[{a}:{b}]"
    pattern = layout.parts["language.layers"]  # ^…layers\.(?P<layer>\d+)\.
    numbers = str(a) if b == a + 1 else "(?:" + "|".join(str(i) for i in range(a, b)) + ")"
    return "re:^(?=.*" + escaped + ")" + pattern.removeprefix("^").replace(r"(?P<layer>\d+)", numbers)


def _layout(cfg: _Config) -> tuple[Any, list[str]]:
    """The base's layout (its decoder layers) and tensor names, read once; a gradient refused on a model with a
    vision tower."""
    if cfg.layers is None:
        from .checkpoint.lora import open_model

        reader = open_model(cfg.base_ref)
        names = reader.names()
        cfg.layers = layouts.detect_layout(reader.config, names), names
    return cfg.layers


def _refuse_vision(cfg: _Config, layout: Any, names: list[str]) -> None:
    if any(layouts.part_of(layout, n) == "vision" for n in names):
        raise cfg.refuse(
            "parameters",
            f"a per-layer gradient on a model with a vision tower ({cfg.base_ref}): mergekit interpolates over "
            "each module's own layers, forgetless over the decoder layers",
            "give values per part in a forgetless recipe (docs/recipes.md)",
        )


def _values(v: Any, fn) -> Any:
    """`fn` applied to one value, or to the value of every entry per part."""
    if isinstance(v, list):
        return [{**e, "value": fn(e["value"])} for e in v]
    return fn(v)


def _dtype(data: dict, refuse) -> str:
    """forgetless's output dtype: mergekit's ``out_dtype``, else its ``dtype`` (its compute and output dtype),
    else the base's."""
    names = {}
    for key in ("out_dtype", "dtype"):
        v = data.get(key)
        if v is not None:
            names[key] = v.removeprefix("torch.") if isinstance(v, str) else v
            if names[key] not in DTYPES:
                raise refuse(key, f"{v!r}: forgetless writes {', '.join(DTYPES)}", "choose one of them")
    return names.get("out_dtype", names.get("dtype", "base"))
