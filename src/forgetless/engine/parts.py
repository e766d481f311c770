"""A method's number parameters given per part of the model, as a recipe writes them:

    parameters:
      lambda:
        - {scope: "language.layers[0:10]", value: 0.3}
        - {scope: [projector, "language.layers[10:30]"], value: 0.8}
        - {value: 0.5}                      # the default: required, last

A tensor takes the value of the first entry whose scope selects it (the selectors of ``scope.include``), else the
default. :func:`.checks.resolve_params` reads each list into a :class:`PartValues`; the plan binds it to the
checkpoint's tensor names (:func:`bind_params`), and the runners call the method per tensor with
:func:`tensor_params`, the values that tensor takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..checkpoint import layout as layouts
from ..errors import ForgetlessError

SHOWN_NAMES = 2  # tensors named per entry in the table


@dataclass(frozen=True)
class PartValues:
    """One parameter's entries: each entry's selectors and value, the default last (it has no selectors)."""

    key: str  # where the recipe gives it: parameters.lambda, models[1].weight
    scopes: tuple[tuple[str, ...], ...]  # each entry's selectors, the default's left out
    values: tuple[Any, ...]  # each entry's value, the default last
    chosen: tuple[frozenset[str], ...] = ()  # the tensors each entry's scope selects, once bound

    def bind(self, layout: layouts.Layout, names: list[str], where: str) -> PartValues:
        """The entries resolved on the checkpoint's names; a selector that selects no tensor refused, naming its
        entry."""
        chosen = []
        for i, selectors in enumerate(self.scopes):
            try:
                chosen.append(frozenset(layouts.select(layout, names, list(selectors), file=where)))
            except ForgetlessError as e:
                raise ForgetlessError(
                    f"{self.key}[{i}].scope: {e.problem}", file=where, remedy=e.remedy
                ) from None
        return replace(self, chosen=tuple(chosen))

    def entry(self, name: str) -> int:
        """The index of the entry tensor `name` takes (the default's is the last)."""
        return next((i for i, s in enumerate(self.chosen) if name in s), len(self.scopes))

    def value(self, name: str) -> Any:
        return self.values[self.entry(name)]

    def __repr__(self) -> str:
        return f"per part ({', '.join(map(str, self.values[:-1]))}; default {self.values[-1]})"


def _each(params: dict[str, Any]) -> Iterator[PartValues]:
    """The PartValues among the method's keyword arguments (per-model lists included)."""
    for v in params.values():
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, PartValues):
                yield x


def has_parts(params: dict[str, Any]) -> bool:
    return any(True for _ in _each(params))


def _mapped(v: Any, fn) -> Any:
    if isinstance(v, PartValues):
        return fn(v)
    if isinstance(v, list) and any(isinstance(x, PartValues) for x in v):
        return [_mapped(x, fn) for x in v]
    return v


def bind_params(
    params: dict[str, Any], layout: layouts.Layout, names: list[str], where: str
) -> dict[str, Any]:
    """`params` with every PartValues bound to the checkpoint's tensor names."""
    return {k: _mapped(v, lambda pv: pv.bind(layout, names, where)) for k, v in params.items()}


def tensor_params(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The method's keyword arguments for tensor `name`: each value given per part resolved to the one it takes."""
    return {k: _mapped(v, lambda pv: pv.value(name)) for k, v in params.items()}


def parts_table(params: dict[str, Any], merged: Iterable[str]) -> str:
    """Per entry of every parameter given per part: its value, how many of the `merged` tensors took it (and the
    first of them), and its scope; '' when no parameter is given per part."""
    merged = list(merged)
    rows = []
    for pv in dict.fromkeys(_each(params)):  # a recipe-wide per-model value is shared by every model
        took: list[list[str]] = [[] for _ in pv.values]
        for n in merged:
            took[pv.entry(n)].append(n)
        for i, (value, names) in enumerate(zip(pv.values, took)):
            scope = ", ".join(pv.scopes[i]) if i < len(pv.scopes) else "(default)"
            first = ", ".join(names[:SHOWN_NAMES]) + (", …" if len(names) > SHOWN_NAMES else "")
            entry, example = f"{pv.key}[{i}]", f"  e.g. {first}" if first else ""
            rows.append(f"{entry:<24} {value!s:>12} {len(names):>8}  {scope}{example}")
    if not rows:
        return ""
    return "\n".join([f"{'parameter entry':<24} {'value':>12} {'tensors':>8}  scope", *rows])
