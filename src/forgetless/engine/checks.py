"""The plan's checks of a recipe against its inputs, each run before any output exists.

Every check here either returns what it resolved or raises one :class:`ForgetlessError` that names the recipe key
or file at fault and what to do, so that a ``--dry-run`` finds every problem a merge would meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint.guard import check_output
from ..checkpoint.lora import parse_model_ref
from ..errors import ForgetlessError
from ..methods import MethodSpec
from ..methods.registry import REQUIRED
from ..recipe import EXAMPLES_HINT, Recipe, part_entries
from ..stats.store import Statistics
from .parts import PartValues, tensor_params

MAX_LISTED = 12  # problems listed in one error


def listed(problems: list[str]) -> str:
    """The first :data:`MAX_LISTED` problems, and how many more."""
    more = len(problems) - MAX_LISTED
    return "; ".join(problems[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _refused(problem: str, where: Any) -> ForgetlessError:
    """A recipe's parameter refused, with the examples to follow."""
    return ForgetlessError(problem, file=where, remedy=EXAMPLES_HINT)


def resolve_params(recipe: Recipe, spec: MethodSpec) -> dict[str, Any]:
    """The method's keyword arguments (python keyword -> value; per-model ones as lists, one per model; a number
    given per part as a :class:`.parts.PartValues`) from the recipe's ``parameters`` and ``models[i]``, each value
    checked against the method's signature."""
    where = recipe.source or "recipe"
    unknown = sorted(set(recipe.parameters) - set(spec.params))
    if unknown:
        takes = ", ".join(spec.params) or "none"
        raise _refused(
            f"parameters.{unknown[0]}: method {spec.name!r} has no such parameter (it takes: {takes})", where
        )
    params = {
        spec.arg(p): _param_value(recipe, spec, p, default, where) for p, default in spec.params.items()
    }
    for p in spec.params:
        _check_values(recipe, spec, p, params[spec.arg(p)], where)
    if not _weights_per_part(params):
        check_weight_sum(spec, params, where)
    for i, m in enumerate(recipe.models):
        extra = sorted(set(m.params) - set(spec.per_model))
        if extra:
            per_model = ", ".join(spec.per_model) or "none"
            raise _refused(
                f"models[{i}].{extra[0]}: not a per-model parameter of {spec.name!r} (per-model: {per_model})",
                where,
            )
    return params


def check_weight_sum(spec: MethodSpec, params: dict[str, Any], where: str, tensor: str | None = None) -> None:
    """Refuse weights summing to 0 for a method that divides by their sum (Σ wθ / Σ w); `params` as `tensor`
    takes them when they are given per part."""
    weights = params.get("weight")
    if spec.divides_by_weights and isinstance(weights, list) and len(weights) > 1 and sum(weights) == 0:
        raise ForgetlessError(
            f"models[*].weight: the weights {weights} sum to 0, and {spec.name} divides by their sum",
            file=where,
            tensor=tensor,
            remedy="give weights with a non-zero sum",
        )


def check_part_weights(spec: MethodSpec, params: dict[str, Any], merged: list[str], where: str) -> None:
    """:func:`check_weight_sum` for every merged tensor, when some weight is given per part."""
    if spec.divides_by_weights and _weights_per_part(params):
        for name in merged:
            check_weight_sum(spec, tensor_params(params, name), where, name)


def _weights_per_part(params: dict[str, Any]) -> bool:
    weights = params.get("weight")
    return isinstance(weights, list) and any(isinstance(w, PartValues) for w in weights)


def _param_value(recipe: Recipe, spec: MethodSpec, p: str, default: Any, where: str) -> Any:
    """Parameter `p`'s value: a model's own, else the recipe's, else the default; a list for a per-model one."""
    if p not in spec.per_model:
        v = recipe.parameters.get(p, default)
        if v is REQUIRED:
            raise _refused(f"parameters.{p}: required by {spec.name!r}", where)
        return _per_part(spec, p, v, f"parameters.{p}", where)
    values = []
    for i, m in enumerate(recipe.models):
        v = m.params.get(p, recipe.parameters.get(p, default))
        if v is REQUIRED:
            raise ForgetlessError(
                f"models[{i}].{p}: required by {spec.name!r}",
                file=where,
                remedy=f"set parameters.{p} or models[{i}].{p}",
            )
        key = f"models[{i}].{p}" if p in m.params else f"parameters.{p}"
        values.append(_per_part(spec, p, v, key, where))
    return values


def _per_part(spec: MethodSpec, p: str, v: Any, key: str, where: str) -> Any:
    """`v` as it is, or, given as a list of ``{scope, value}`` entries, their :class:`.parts.PartValues`: refused
    for a parameter that is not a number or a method with a pre-pass over the whole model, each value checked."""
    if not isinstance(v, list):
        return v
    kind = spec.kinds.get(p, ("any", True))[0]
    if kind not in ("float", "int") or p in spec.choices:
        raise _refused(f"{key}: a value per part is for number parameters; give one value", where)
    if spec.streaming.prepare is not None:
        raise _refused(
            f"{key}: {spec.name!r} takes one value of its parameters over the whole model (its pre-pass "
            "ranks every tensor at once); give one value",
            where,
        )
    try:
        entries = part_entries(v, key)
    except ValueError as e:
        raise _refused(str(e), where) from None
    for j, (_, value) in enumerate(entries):
        problem = spec.problem(p, value)
        if problem is not None:
            raise _refused(f"{key}[{j}].value: {problem} (method {spec.name!r})", where)
    return PartValues(key, tuple(s for s, _ in entries[:-1]), tuple(value for _, value in entries))


def _check_values(recipe: Recipe, spec: MethodSpec, p: str, value: Any, where: str) -> None:
    """Refuse a value of `p` of the wrong type, outside its interval or not among its choices, naming its key."""
    for i, v in enumerate(value if p in spec.per_model else [value]):
        problem = None if isinstance(v, PartValues) else spec.problem(p, v)
        if problem is not None:
            key = (
                f"models[{i}].{p}"
                if p in spec.per_model and p in recipe.models[i].params
                else f"parameters.{p}"
            )
            raise _refused(f"{key}: {problem} (method {spec.name!r})", where)


def resolve_method_device(value: str, where: str) -> str:
    """The recipe's ``device:`` as the device a method gets (``cpu``, ``cuda:N``), refused before any work
    when it is malformed or this machine lacks it."""
    from ..methods.linalg import resolve_device

    try:
        return str(resolve_device(value))
    except ValueError as e:
        raise ForgetlessError(
            f"device: {e}", file=where, remedy="give device: cpu, cuda, cuda:N or auto (CUDA when present)"
        ) from None


def check_structure(base, model, label: str) -> None:
    """Refuse a model whose tensor names or shapes differ from the base's, listing every difference."""
    b, m = base.infos, model.infos
    problems = [f"{n} missing" for n in b if n not in m]
    problems += [f"{n} not in the base" for n in m if n not in b]
    problems += [
        f"{n} {list(m[n].shape)} vs base {list(b[n].shape)}" for n in b if n in m and m[n].shape != b[n].shape
    ]
    if problems:
        raise ForgetlessError(
            f"{len(problems)} tensors differ from the base ({label}): {listed(problems)}",
            file=model.path,
            remedy="merge checkpoints of one architecture "
            "(a resized vocabulary must be resized in the base too)",
        )


def check_paths(recipe: Recipe, out: Path | None, force: bool, stat_files: list[Path]) -> None:
    """Refuse an output folder that exists (unless `force`) or that is one of the inputs."""
    if out is None:
        return
    inputs = [p for ref in [recipe.base, *(m.model for m in recipe.models)] for p in parse_model_ref(ref)]
    check_output(out, [*inputs, *stat_files], force=force)


def refuse_other_bases(folds: list[tuple[str, Any, Path]], where: str) -> None:
    """Folding an adapter into another model than the one it was trained on writes a model nobody trained:
    refused, naming them. ``folds``: (label, adapter, the model it is folded into)."""
    others = [
        f"{label} {a.path}: {name[:100]!r} is not {base}"
        for label, a, base in folds
        if (name := a.other_base(base))
    ]
    if others:
        raise ForgetlessError(
            f"fold: {len(others)} adapter(s) name another base model in "
            f"base_model_name_or_path ({'; '.join(others[:MAX_LISTED])})",
            file=where,
            remedy="fold adapters into the model they were trained on; if base is that model "
            "under another name, pass --allow-other-model (recipe: allow_other_model: true)",
        )


def open_stat(
    path: str | list[str],
    base,
    key: str,
    where: str,
    spec: MethodSpec,
    need: str,
    weights: dict[str, str] | None = None,
) -> Statistics:
    """A statistic from one file or several that complete each other, checked against the model before any work:
    structure fingerprint, and (`weights`: the weights fingerprints of the base and of every merged model, by
    label; None skips it) that it was taken at one of those weights when the file records where it was taken."""
    paths = [Path(p) for p in (path if isinstance(path, list) else [path])]
    for p in paths:
        if not p.is_file():
            raise ForgetlessError(
                "statistics file not found",
                file=p,
                remedy=f"compute it with `forgetless stats` or fix {key} in {where}",
            )
    stats = Statistics(paths, strict=False)  # a plain safetensors file of statistics is accepted
    _check_stat_model(stats, paths[0], base, weights)
    _check_stat_shapes(stats, base, spec, need)
    return stats


def _check_stat_model(stats: Statistics, p: Path, base, weights: dict[str, str] | None) -> None:
    """Refuse statistics recorded as taken on another model, or at weights that are none of the merge's."""
    fp = stats.meta.get("model_fingerprint")
    if fp is not None and fp != base.fingerprint():
        raise ForgetlessError(
            f"computed on another model (fingerprint {fp}, this base is {base.fingerprint()})",
            file=p,
            remedy="recompute the statistics on this model",
        )
    wfp = stats.meta.get("model_weights_fingerprint")
    if weights is not None and wfp is not None and wfp not in weights.values():
        known = ", ".join(f"{label} {v}" for label, v in weights.items())
        raise ForgetlessError(
            f"computed at other weights of this architecture (weights fingerprint {wfp}; {known})",
            file=p,
            remedy="recompute the statistics at the base or the fine-tuned model, or "
            "pass --allow-other-model (recipe: allow_other_model: true)",
        )


def _check_stat_shapes(stats: Statistics, base, spec: MethodSpec, need: str) -> None:
    """Refuse a statistics tensor the model lacks, or shaped otherwise than the method needs."""
    for name, info in stats.infos.items():
        p = stats.file_of(name)
        if name not in base.infos:
            raise ForgetlessError(
                "statistics for a tensor the model does not have",
                file=p,
                tensor=name,
                remedy="recompute the statistics on this model",
            )
        want = spec.stat_shape(need, tuple(base.infos[name].shape))
        if want is None:
            raise ForgetlessError(
                f"{need!r} statistics for a tensor of shape {list(base.infos[name].shape)}, "
                "which cannot have them",
                file=p,
                tensor=name,
                remedy="recompute the statistics on this model",
            )
        if tuple(info.shape) != want:
            raise ForgetlessError(
                f"shape {list(info.shape)} differs from the expected {list(want)} (the model's "
                f"tensor is {list(base.infos[name].shape)})",
                file=p,
                tensor=name,
                remedy="recompute the statistics on this model",
            )
