"""The method registry: a merge method is a pure function over tensors, registered by a decorator.

    @merge_method("ties", per_model=("weight", "density"), streaming=Streaming(rows="blocks"))
    def ties(base, finetuned, *, weight: PerModel[float] = 1.0, density: PerModel[float] = 0.5, lambda_=1.0): ...

The engine reads everything it needs from the registration and the signature:
- ``models``: "one" (``finetuned`` is a Tensor) or "many" (a list of Tensors, one per recipe model);
- ``needs``: statistics the method consumes, passed as keyword arguments of the same names (a Tensor, or a list
  with one per model when the statistic is listed in ``per_model_needs``);
- keyword parameters with defaults are the recipe's ``parameters``; those listed in ``per_model`` take one value per
  model (recipe ``models[i].<param>``, else ``parameters.<param>`` for all) and arrive as lists (:data:`PerModel`);
- a trailing underscore maps a Python keyword: ``lambda_`` is the recipe's ``lambda``;
- ``stat_shapes``: statistic -> function of the weight's shape giving the statistic's shape (None: this tensor cannot
  have that statistic); a statistic not listed is shaped like the weight. RegMean's ``gram`` is [in, in];
- ``without_statistics``: "route" (default) sends in-scope tensors that lack statistics to ``scope.no_statistics``;
  "call" calls the method without those keywords (so they take their defaults, None), and the method falls back
  by itself (RegMean: the plain average). ``scope.no_statistics`` set in the recipe still wins;
- ``name`` (the tensor's name) and ``generator`` (a torch.Generator seeded from the recipe seed and the tensor
  name; for models="many", a list with one per model, :func:`forgetless.engine.tensor_generators`) are passed when
  the signature asks for them, so a random method is reproducible and order-independent;
  ``counts`` (a collections.Counter of the tensor's part) lets a method report element counts (e.g. CGM†'s kept
  and reverted elements), which the merge report and model card show per part.
- ``streaming``: how the engine may stream the method's tensors (row blocks, pre-passes, views): :class:`Streaming`;
- ``ranges``: recipe parameter -> interval of allowed values in the usual notation (``"(0, 1]"``, ``"[0, inf)"``);
  together with the parameter's annotation (float, int, bool, Literal, ``| None``; per-model lists by their element
  type) the engine checks every value at plan time (:meth:`MethodSpec.problem`), so ``--dry-run`` names a bad one;
- ``space``: "weight" (default; the functions above get whole tensors) or "adapter": the method merges LoRA
  adapters in adapter space (:mod:`.adapter`): its first argument is a list of ``(A, B)`` pairs, one per recipe
  model, with the update ``B @ A``, and it returns one such pair. ``out_rank(ranks, params)`` gives the output
  rank from the input ranks and the recipe parameters (the writer plans every tensor before the first merge);
  ``equal_ranks`` makes the engine refuse adapters of different ranks before any work; ``dense`` says the method
  forms the full [out, in] deltas (for the memory estimate).
- ``uses_device``: the method runs its heavy linear algebra (solves, SVDs) on a device; the engine passes the
  recipe's ``device:`` (resolved: ``cpu``, ``cuda:N``) as the context argument ``device``, and the method
  returns its result on the CPU (RegMean, the adapter-space SVD methods);
- ``divides_by_weights``: the rule normalises by Σ wₖ (a weighted average), so weights summing to 0 are refused;
- ``min_models``: the fewest fine-tuned models the rule is defined for (Model Stock's angles need two), refused
  at plan time;
- ``temporaries``: the float32 copies of a tensor the method allocates besides its inputs (default 4: TIES's |Δ|,
  sign, numerator and denominator), which the engine's memory budget counts for every tensor in flight.
All tensors arrive in float32 as fresh copies that the method owns (the fine-tuned ones of a ``reads_finetuned``
method as views, to be read only): it may work in place on them (and should, for large tensors: every new
allocation costs page faults). The engine casts the result to the output dtype.
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import yaml

CONTEXT_ARGS = ("name", "generator", "counts", "block", "device")
REQUIRED = inspect.Parameter.empty  # the default of a parameter the recipe must give

T = TypeVar("T")
PerModel = list[T] | T  # a generic alias: PerModel[float]
"""A per-model parameter's annotation: the method gets a list, one value per model; one value (the default, or the
recipe's ``parameters.<name>``) is every model's, expanded by the engine."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Streaming:
    """How the engine may stream a method's tensors; only the engine reads it, the method's math never does.

    ``rows``: how the method meets a tensor too large for the merge's memory budget (the engine then reads it in
    blocks of whole rows, along dim 0; a 1-D tensor's rows are its entries). "whole": the engine always passes
    whole tensors. "blocks": called on a block of rows, the method returns those rows of its result on the whole
    tensor, given the context argument ``block`` (a :class:`RowBlock`). ``block`` is None when the method gets the
    whole tensor: it then computes what depends on the whole tensor itself, with the same functions, so both paths
    give the same result. Random methods get the same generators for every block, drawn from block after block.

    ``tensor_prepare(params, stream, shape)``: a pre-pass over one tensor's blocks (``stream()`` yields
    :class:`Rows`) that finds what depends on the whole tensor (TIES's trim thresholds, Fisher's per-tensor means,
    RegMean's factorisation) and returns it as a dict (``block.prepared``); for ``rows="blocks"`` only. A random
    method's gets ``params["generator"]``: generators of its own, in the state its blocks' start from (drawing from
    them draws what the blocks will: DARE's and DELLA's L1 rescale).

    ``prepare(params, stream, numel)``: a pre-pass over the whole model before any tensor is merged (CGM†'s global
    budget): the resolved parameters, a function that streams :class:`Rows` over the tensors the method will merge
    (tensors over the budget as several blocks; callable several times) and their total element count; it returns
    extra keyword arguments for the method (or None).

    ``reads_finetuned``: the method never writes into its fine-tuned tensors (only into ``base``, its statistics or
    tensors of its own), so the engine may hand them over as copy-on-write views of the files, not copies.
    """

    rows: Literal["whole", "blocks"] = "whole"
    tensor_prepare: Callable[[dict[str, Any], Stream, tuple[int, ...]], dict[str, Any]] | None = None
    prepare: Callable[[dict[str, Any], Stream, int], dict[str, Any] | None] | None = None
    reads_finetuned: bool = False


class Rows(NamedTuple):
    """One item of the streams that ``prepare`` and ``tensor_prepare`` get: a whole tensor, or a block of its rows
    whose first entry has flat index ``offset`` (0 for a whole tensor). Fresh float32 copies, as a method gets."""

    name: str
    base: Any  # Tensor
    finetuned: Any  # Tensor (models="one") or list of Tensors
    stats: dict[str, Any]
    offset: int = 0


Stream = Callable[
    [], Iterable[Rows]
]  # a pre-pass's input: each call, a fresh pass over the tensors or their blocks


@dataclass(frozen=True)
class RowBlock:
    """The context argument ``block`` of a method called on a block of a tensor's rows."""

    offset: int  # flat index of the block's first entry in the whole tensor
    shape: tuple[int, ...]  # the whole tensor's shape
    prepared: dict[str, Any]  # what the method's tensor_prepare returned for this tensor ({} without one)


@dataclass(frozen=True)
class Interval:
    """Allowed values of a numeric parameter: ``lo``..``hi``, each end open or closed (``"(0, 1]"``)."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*", text)
        if m is None:
            raise ValueError(f"not an interval: {text!r} (e.g. '(0, 1]')")
        return cls(float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")")

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        def end(x: float) -> str:
            return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"

        return f"{'(' if self.lo_open else '['}{end(self.lo)}, {end(self.hi)}{')' if self.hi_open else ']'}"


def _kinds(fn: Callable[..., Any]) -> dict[str, tuple[str, bool]]:
    """Recipe parameter -> (its scalar kind: "float", "int", "bool", "str" or "any"; whether None is allowed), from
    the annotations (a per-model ``PerModel[float]`` is checked value by value, as ``float``)."""
    out = {}
    for name, h in typing.get_type_hints(fn).items():
        union = typing.get_origin(h) in (typing.Union, types.UnionType)
        args = typing.get_args(h) if union else (h,)
        scalars = {
            typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args if a is not type(None)
        }
        one = scalars.pop() if len(scalars) == 1 else None
        out[name.rstrip("_")] = (
            {float: "float", int: "int", bool: "bool", str: "str"}.get(one, "any"),
            type(None) in args,
        )
    return out


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    models: Literal["one", "many"]
    needs: tuple[str, ...]
    per_model_needs: tuple[str, ...]
    per_model: tuple[str, ...]
    params: dict[str, Any]  # recipe name -> default (inspect.Parameter.empty when required)
    context: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())
    doc: str = ""
    stat_shapes: dict[str, Callable[[tuple[int, ...]], tuple[int, ...] | None]] = field(default_factory=dict)
    without_statistics: Literal["route", "call"] = "route"
    choices: dict[str, tuple[Any, ...]] = field(
        default_factory=dict
    )  # recipe name -> allowed values (Literal)
    space: Literal["weight", "adapter"] = "weight"
    kinds: dict[str, tuple[str, bool]] = field(default_factory=dict)  # recipe name -> (kind, None allowed)
    ranges: dict[str, Interval] = field(default_factory=dict)  # recipe name -> allowed interval
    out_rank: Callable[[list[int], dict[str, Any]], int] | None = None
    equal_ranks: bool = False
    dense: bool = False
    divides_by_weights: bool = (
        False  # the rule normalises by Σ wₖ (a weighted average): weights summing to 0 fail
    )
    uses_device: bool = False  # gets the recipe's device as the context argument `device`
    min_models: int = 1  # the fewest fine-tuned models the rule is defined for
    temporaries: int = 4  # float32 copies of a tensor the method allocates besides its inputs (the budget's)
    streaming: Streaming = field(default_factory=Streaming)  # read by the engine only

    def stat_shape(self, need: str, weight_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape statistic `need` must have for a tensor of `weight_shape` (None: it cannot have one)."""
        rule = self.stat_shapes.get(need)
        return tuple(weight_shape) if rule is None else rule(tuple(weight_shape))

    def stat_in_rows(self, need: str, weight_shape: tuple[int, ...]) -> bool:
        """Whether statistic `need` is shaped like the weight, and so is read in the same row blocks (RegMean's
        Gram is not: it comes whole with every block)."""
        return self.stat_shape(need, weight_shape) == tuple(weight_shape)

    def problem(self, param: str, value: Any) -> str | None:
        """What is wrong with `value` for recipe parameter `param` (its type, its interval, its choices), or
        None when it is fine."""
        allowed = self.choices.get(param)
        if allowed is not None:
            listed = ", ".join(map(as_yaml, allowed))
            return None if is_choice(value, allowed) else f"{value!r} is not one of {listed}"
        kind, optional = self.kinds.get(param, ("any", True))
        if value is None:
            return None if optional or kind == "any" else f"a value is required (a {kind})"
        rng = self.ranges.get(param)
        want = (
            f"a number in {rng}"
            if rng and kind == "float"
            else f"an integer in {rng}"
            if rng and kind == "int"
            else {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}.get(
                kind
            )
        )
        if kind == "float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return f"{value!r} is not {want}"
        if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"{value!r} is not {want}"
        if kind == "bool" and not isinstance(value, bool):
            return f"{value!r} is not {want}"
        if kind == "str" and not isinstance(value, str):
            return f"{value!r} is not {want}"
        if kind in ("float", "int"):
            if not math.isfinite(value):
                return f"{value!r} is not a finite number"
            if rng is not None and value not in rng:
                return f"{value!r} is outside {rng}"
        return None

    def arg(self, recipe_name: str) -> str:
        """The Python keyword for a recipe parameter name."""
        return recipe_name + "_" if recipe_name + "_" in self._sig_names() else recipe_name

    def _sig_names(self) -> set[str]:
        return set(inspect.signature(self.fn).parameters)


METHODS: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    *,
    models: Literal["one", "many"] = "many",
    needs: tuple[str, ...] = (),
    per_model_needs: tuple[str, ...] = (),
    per_model: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    stat_shapes: dict[str, Callable[[tuple[int, ...]], tuple[int, ...] | None]] | None = None,
    without_statistics: Literal["route", "call"] = "route",
    space: Literal["weight", "adapter"] = "weight",
    out_rank: Callable[[list[int], dict[str, Any]], int] | None = None,
    equal_ranks: bool = False,
    dense: bool = False,
    ranges: dict[str, str] | None = None,
    divides_by_weights: bool = False,
    uses_device: bool = False,
    min_models: int = 1,
    temporaries: int = 4,
    streaming: Streaming = Streaming(),
) -> Callable[[F], F]:
    """Register the decorated function as merge method `name` (and its `aliases`); the options are the module
    docstring's. A registration that contradicts the signature is a TypeError at import, not at a user's merge."""

    def register(fn: F) -> F:
        params, context = _signature(fn, (*needs, *per_model_needs))
        spec = MethodSpec(
            name,
            fn,
            models,
            tuple(needs) + tuple(per_model_needs),
            tuple(per_model_needs),
            tuple(per_model),
            params,
            context,
            tuple(aliases),
            inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0],
            dict(stat_shapes or {}),
            without_statistics,
            choices=_literal_choices(fn),
            space=space,
            kinds=_kinds(fn),
            ranges={k: Interval.parse(v) for k, v in (ranges or {}).items()},
            out_rank=out_rank,
            equal_ranks=equal_ranks,
            dense=dense,
            divides_by_weights=divides_by_weights,
            uses_device=uses_device,
            min_models=min_models,
            temporaries=temporaries,
            streaming=streaming,
        )
        _check_registration(spec)
        for key in (name, *aliases):
            if key in METHODS:
                raise ValueError(f"merge method {key!r} registered twice")
            METHODS[key] = spec
        return fn

    return register


def _signature(fn: Callable[..., Any], stats: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The recipe parameters (recipe name -> default) and the context arguments among `fn`'s keyword-only
    parameters; `stats` (the statistics it needs) are neither."""
    params: dict[str, Any] = {}
    context = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name in CONTEXT_ARGS:
            context.append(p.name)
        elif p.name not in stats:
            params[p.name.rstrip("_")] = p.default
    return params, tuple(context)


def _check_registration(spec: MethodSpec) -> None:
    """Refuse a registration whose options contradict each other or the signature."""
    fn, streaming = spec.fn.__name__, spec.streaming
    for pm in spec.per_model:
        if pm not in spec.params:
            raise TypeError(f"{fn}: per-model parameter {pm!r} is not a keyword parameter")
    if spec.space == "adapter" and spec.out_rank is None:
        raise TypeError(f"{fn}: an adapter-space method needs out_rank")
    if set(spec.ranges) - set(spec.params):
        raise TypeError(
            f"{fn}: ranges for parameters it does not take: {sorted(set(spec.ranges) - set(spec.params))}"
        )
    if streaming.rows == "blocks" and "block" not in spec.context:
        raise TypeError(f"{fn}: rows='blocks' needs the context argument `block`")
    if spec.uses_device != ("device" in spec.context):
        raise TypeError(f"{fn}: uses_device=True and the context argument `device` go together")
    if streaming.tensor_prepare is not None and streaming.rows != "blocks":
        raise TypeError(f"{fn}: tensor_prepare is for rows='blocks'")
    unknown = set(spec.stat_shapes) - set(spec.needs)
    if unknown:
        raise TypeError(f"{fn}: stat_shapes for statistics it does not need: {sorted(unknown)}")


def as_yaml(value: Any) -> str:
    """A recipe value as a user writes it in YAML (true, null, total; a string quoted only where YAML needs it)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def is_choice(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether `value` is one of `allowed`, type included (YAML's 1 is not `true`, though Python's 1 == True)."""
    return any(value == a and type(value) is type(a) for a in allowed)


def _literal_choices(fn: Callable[..., Any]) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each parameter annotated with a Literal, so that the engine checks a recipe's values
    before any work (a bad `sign:` fails at plan time, not at the first tensor)."""
    hints = typing.get_type_hints(fn)
    return {
        name.rstrip("_"): typing.get_args(h) for name, h in hints.items() if typing.get_origin(h) is Literal
    }


def get_method(name: str) -> MethodSpec:
    """The registered method (or alias) `name`."""
    return METHODS[name]
