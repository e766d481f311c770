"""The scores forgetless reports: specialization against retention, in percentage points.

A result (what :func:`forgetless.eval.harness.evaluate` returns and ``forgetless eval`` writes) holds, per task, its
``kind`` and ``accuracy`` (a fraction). From it:

- **T**, the task score: the mean accuracy over the ``downstream`` tasks, ×100.
- **G_v**, the visual general score: the mean accuracy over the ``general_visual`` tasks, ×100.
- **G_t**, the text general score: the mean accuracy over the ``general_text`` tasks, ×100.
- **G**, the general score: the mean of G_v and G_t (of whichever exist; each kind weighs the same however many
  tasks it has).

A score whose tasks are absent is ``None``. Relative to the base (pre-trained) model and the fine-tuned model,
for a model m:

- **E = T(m) − T(base)**: the specialization gain, in points.
- **F = G(m) − G(base)**: the change in general ability, signed: negative is forgetting, positive a gain.
- **E + F**: their sum, the net effect (a fine-tune that gains 20 points and forgets 5 nets 15).
- **gain kept = E(m) / E(ft)**: the fraction of the fine-tuned model's gain that m keeps (1.0: all of it; a
  fraction, not points; ``None`` when the fine-tune gained nothing).

E, F and E + F are in percentage points. Results are compared only when they cover the same tasks, split and
sample counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ForgetlessError

SCORE_KEYS = ("T", "G_v", "G_t", "G")
COMPARE_KEYS = ("E", "F", "E+F", "gain_kept")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _by_kind(result: Mapping[str, Any], kind: str) -> list[float]:
    return [float(t["accuracy"]) for t in result.get("tasks", {}).values() if t.get("kind") == kind]


def scores(result: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"T", "G_v", "G_t", "G"}`` of one result, in percent (``None`` where the result has no such task)."""
    t = _mean(_by_kind(result, "downstream"))
    gv = _mean(_by_kind(result, "general_visual"))
    gt = _mean(_by_kind(result, "general_text"))
    g = _mean([x for x in (gv, gt) if x is not None])
    return {k: (None if v is None else 100.0 * v) for k, v in zip(SCORE_KEYS, (t, gv, gt, g))}


def _check_same(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> None:
    ta, tb = a.get("tasks", {}), b.get("tasks", {})
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            raise ForgetlessError(f"task {name!r} is in one result but not in the {what}'s",
                                  file=b.get("path") or a.get("path"),
                                  remedy="evaluate every model on the same --tasks and --general")
        ka, kb = ta[name].get("kind"), tb[name].get("kind")
        na, nb = ta[name].get("n"), tb[name].get("n")
        if ka != kb or na != nb:
            raise ForgetlessError(f"task {name!r} differs from the {what}'s (kind {ka} vs {kb}, n {na} vs {nb})",
                                  file=b.get("path") or a.get("path"),
                                  remedy="evaluate every model with the same --split and --limit")
    if a.get("split") != b.get("split"):
        raise ForgetlessError(f"split {a.get('split')!r} differs from the {what}'s ({b.get('split')!r})",
                              remedy="evaluate every model on the same --split")


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def compare(model: Mapping[str, Any], base: Mapping[str, Any], finetuned: Mapping[str, Any] | None = None
            ) -> dict[str, float | None]:
    """T, G_v, G_t, G of ``model`` and, relative to ``base`` (and ``finetuned``): E, F, E+F (points) and
    gain_kept (a fraction; needs ``finetuned``). See the module docstring for the definitions."""
    _check_same(model, base, "base model")
    if finetuned is not None:
        _check_same(model, finetuned, "fine-tuned model")
    s, b = scores(model), scores(base)
    e, f = _diff(s["T"], b["T"]), _diff(s["G"], b["G"])
    out: dict[str, float | None] = {**s, "E": e, "F": f, "E+F": None if e is None or f is None else e + f,
                                    "gain_kept": None}
    if finetuned is not None and e is not None:
        e_ft = _diff(scores(finetuned)["T"], b["T"])
        if e_ft is not None and abs(e_ft) > 1e-12:
            out["gain_kept"] = e / e_ft
    return out
