"""``forgetless sweep``: a grid of a merge method's knob, evaluated on validation splits, drawn as the
specialization–retention trade-off, and one point picked by a stated rule.

Each recipe (a merge recipe: method, base, one fine-tuned model, statistics…) is merged once per grid value into a
scratch folder, evaluated (cached by weights digest, so repeated points and the base/fine-tuned models cost
nothing the second time), and removed. The base and fine-tuned models are evaluated as reference points.

The rule (``min_task_ratio``, default 0.98): among the grid points whose task score T is at least that fraction of
the fine-tuned model's, the one with the best general score G (ties: higher T, then the earlier point). If no
point qualifies, the one with the highest T, and the result says so.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError


def parse_param(spec: str) -> tuple[str | None, str, list[float]]:
    """``[method:]name=v1,v2,...`` → (method or None, name, values)."""
    if "=" not in spec:
        raise ForgetlessError(f"--param {spec!r} is not NAME=V1,V2,...", remedy="e.g. --param alpha=0.05,0.2,1")
    key, _, values = spec.partition("=")
    method, _, name = key.rpartition(":")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ForgetlessError(f"--param {spec!r}: values must be numbers", remedy="e.g. --param lambda=0.2,0.5"
                              ) from None
    if not vals:
        raise ForgetlessError(f"--param {spec!r} has no values", remedy="e.g. --param lambda=0.2,0.5")
    return method or None, name.strip(), vals


def choose(points: list[dict], ft_task: float, min_task_ratio: float = 0.98) -> tuple[dict | None, bool]:
    """(chosen point, whether it met the rule) — see the module docstring."""
    if not points:
        return None, False
    ok = [p for p in points if p["T"] >= min_task_ratio * ft_task]
    if ok:
        return max(ok, key=lambda p: (p["G"], p["T"], -points.index(p))), True
    return max(points, key=lambda p: (p["T"], p["G"], -points.index(p))), False


def _grid_for(method: str, accepted: set[str], params: list[tuple[str | None, str, list[float]]]):
    out = []
    for m, name, values in params:
        if m is not None and m != method:
            continue
        if name not in accepted:
            if m is not None:
                raise ForgetlessError(f"method {method!r} has no parameter {name!r}",
                                      remedy=f"its parameters: {', '.join(sorted(accepted))}")
            continue
        out.append((name, values))
    return out


def _accuracy(result: dict) -> dict[str, float]:
    return {n: 100.0 * t["accuracy"] for n, t in result["tasks"].items()}


def sweep(recipes: Sequence[dict | str | Path], params: Sequence[str], *, tasks: dict[str, Any],
          general: dict[str, Any], workdir: str | Path, split: str = "val", limit: int | None = None,
          min_task_ratio: float = 0.98, plot: str | Path | None = None, out: str | Path | None = None,
          batch_size: int = 8, log: Callable[[str], None] | None = print) -> dict:
    """Run the grid (module docstring); returns ``{"points", "base", "finetuned", "chosen", "rule", ...}``."""
    import forgetless

    from ..methods.registry import METHODS
    from ..recipe import load_recipe
    from .cache import cached_evaluate
    from .metrics import Bootstrap, compare
    from .report import format_table, tradeoff_plot, write_json

    say = log or (lambda _s: None)
    workdir = Path(workdir)
    grid = [parse_param(p) for p in params]
    loaded = []
    for r in recipes:
        if isinstance(r, dict):
            d = copy.deepcopy(r)
        else:
            import yaml

            d = yaml.safe_load(Path(r).read_text())
        load_recipe(d)  # validated (clear errors) before anything runs
        if d["method"] not in METHODS:
            raise ForgetlessError(f"unknown method {d['method']!r}", remedy="see `forgetless methods`")
        if len(d.get("models") or []) != 1:
            raise ForgetlessError("a sweep recipe merges one fine-tuned model into its base", remedy="give one model")
        m = METHODS[d["method"]]
        accepted = set(m.params)
        g = _grid_for(m.name, accepted, grid)
        if not g:
            raise ForgetlessError(f"no --param applies to method {d['method']!r}",
                                  remedy=f"its parameters: {', '.join(sorted(accepted))}")
        loaded.append((d, g))
    first = loaded[0][0]
    base = Path(first["base"])
    m0 = first["models"][0]
    ft = Path(m0["model"] if isinstance(m0, dict) else m0)
    cache = workdir / "eval-cache"

    def evaluate(model: Path) -> dict:
        r, cached = cached_evaluate(model, tasks, general, cache_dir=cache, split=split, limit=limit,
                                    batch_size=batch_size, log=None)
        say(f"  evaluated {model}{' (cached)' if cached else ''}: {r['scores']}")
        return r

    base_r, ft_r = evaluate(base), evaluate(ft)
    boot = Bootstrap()  # 95% intervals, E and F paired with the base's items

    def intervals(r: dict) -> dict:
        return boot.intervals(boot.compare(r, base_r))

    points: list[dict] = []
    for d, g in loaded:
        for name, values in g:
            for v in values:
                rec = copy.deepcopy(d)
                rec.setdefault("parameters", {})[name] = v
                folder = workdir / "merged" / f"{d['method']}-{name}-{v:g}"
                say(f"{d['method']} {name}={v:g}: merging")
                forgetless.merge(rec, out=folder, force=True, progress=False, log=None)
                r = evaluate(folder)
                shutil.rmtree(folder, ignore_errors=True)
                points.append({"method": d["method"], "param": name, "value": v, "knob": f"{name}={v:g}",
                               **compare(r, base_r, ft_r), "accuracy": _accuracy(r), "intervals": intervals(r)})
    ft_scores = compare(ft_r, base_r, ft_r)
    chosen, met = choose(points, ft_scores["T"], min_task_ratio)
    rule = f"best G with T ≥ {min_task_ratio:g} × T(fine-tuned) = {min_task_ratio * ft_scores['T']:.1f}"
    rows = [{"method": "base", "knob": "", **compare(base_r, base_r, ft_r), "accuracy": _accuracy(base_r),
             "intervals": intervals(base_r)},
            {"method": "fine-tuned", "knob": "", **ft_scores, "accuracy": _accuracy(ft_r),
             "intervals": intervals(ft_r)},
            *points]
    say(format_table([{"name": f"{r['method']} {r['knob']}".strip(), **r} for r in rows]))
    if chosen is not None:
        say(f"chosen ({rule}{'' if met else '; no point met it, highest T instead'}): {chosen['method']} "
            f"{chosen['knob']}: T {chosen['T']:.1f}, G {chosen['G']:.1f}")
    result = {"split": split, "limit": limit, "rule": rule, "rule_met": met, "chosen": chosen,
              "base": compare(base_r, base_r, ft_r), "finetuned": ft_scores, "points": points}
    if plot:
        bars = [{"task_interval": r["intervals"]["T"], "general_interval": r["intervals"]["G"]} for r in rows]
        pts = [{"method": "base", "task": result["base"]["T"], "general": result["base"]["G"], "role": "base",
                **bars[0]},
               {"method": "fine-tuned", "task": ft_scores["T"], "general": ft_scores["G"], "role": "finetuned",
                **bars[1]}]
        pts += [{"method": p["method"], "task": p["T"], "general": p["G"], "knob": p["value"],
                 "chosen": p is chosen, **b} for p, b in zip(points, bars[2:])]
        tradeoff_plot(pts, plot, title=f"trade-off on {split} ({', '.join(tasks)})")
        result["plot"] = str(plot)
    if out:
        write_json(out, result)
    return result
