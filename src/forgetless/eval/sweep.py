"""``forgetless sweep``: a grid of a merge method's knob, evaluated on validation splits, drawn as the
specialization–retention trade-off, and one point picked by a stated rule.

Each recipe (a merge recipe: method, base, one fine-tuned model, statistics…) is merged once per grid value into a
scratch folder, evaluated (cached by weights digest, so repeated points and the base/fine-tuned models cost
nothing the second time), and removed. The base and fine-tuned models are evaluated as reference points.

The rule, what the user states (:class:`Rule`; one of):

- ``keep_gain`` g ("keep at least 95% of the task gain"): among the points with E ≥ g·E(fine-tuned), the best F;
- ``max_loss`` L ("lose at most 2 points of general score"): among the points with F ≥ −L, the best E;
- ``min_task_ratio`` r (the default, 0.98): among the points with T ≥ r·T(fine-tuned), the best G.

Ties go to the other score, then to the earlier point. If no point qualifies, the one closest to qualifying (the
highest E, F or T), and the result says so. With ``held_out`` (a split, e.g. "test") the chosen point is merged
again and evaluated there with the base and the fine-tuned model: what the choice is expected to give on data it
was not chosen on, with 95% intervals, and whether the stated target holds there.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from ..stats.distributed import barrier, process_group
from .harness import EvalOptions


def parse_param(spec: str) -> tuple[str | None, str, list[float]]:
    """``[method:]name=v1,v2,...`` → (method or None, name, values)."""
    if "=" not in spec:
        raise ForgetlessError(
            f"--param {spec!r} is not NAME=V1,V2,...", remedy="e.g. --param alpha=0.05,0.2,1"
        )
    key, _, values = spec.partition("=")
    method, _, name = key.rpartition(":")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ForgetlessError(
            f"--param {spec!r}: values must be numbers", remedy="e.g. --param lambda=0.2,0.5"
        ) from None
    if not vals:
        raise ForgetlessError(f"--param {spec!r} has no values", remedy="e.g. --param lambda=0.2,0.5")
    return method or None, name.strip(), vals


@dataclass(frozen=True)
class Rule:
    """What the user wants of the chosen point (module docstring): exactly one of the three is used, the first
    set of ``keep_gain``, ``max_loss``, then ``min_task_ratio``."""

    min_task_ratio: float = 0.98
    keep_gain: float | None = None
    max_loss: float | None = None

    def __post_init__(self):
        if self.keep_gain is not None and self.max_loss is not None:
            raise ForgetlessError(
                "give one target: --keep-gain or --max-loss, not both",
                remedy="state what matters most; the other score is then made as good as it gets",
            )
        if self.keep_gain is not None and not 0 < self.keep_gain <= 1.5:
            raise ForgetlessError(
                f"--keep-gain {self.keep_gain:g} is a fraction of the task gain, e.g. 0.95",
                remedy="give a fraction in (0, 1.5]",
            )
        if self.max_loss is not None and self.max_loss < 0:
            raise ForgetlessError(
                f"--max-loss {self.max_loss:g}: points of general score lost, ≥ 0", remedy="e.g. --max-loss 2"
            )

    def keys(self) -> tuple[str, str]:
        """(the score the target bounds, the score then maximised)."""
        return (
            ("E", "F")
            if self.keep_gain is not None
            else ("F", "E")
            if self.max_loss is not None
            else ("T", "G")
        )

    def bound(self, finetuned: dict) -> float:
        if self.keep_gain is not None:
            return self.keep_gain * finetuned["E"]
        if self.max_loss is not None:
            return -self.max_loss
        return self.min_task_ratio * finetuned["T"]

    def describe(self, finetuned: dict) -> str:
        if self.keep_gain is not None:
            return f"best F with E ≥ {self.keep_gain:g} × E(fine-tuned) = {self.bound(finetuned):.1f}"
        if self.max_loss is not None:
            return f"best E with F ≥ −{self.max_loss:g}"
        return f"best G with T ≥ {self.min_task_ratio:g} × T(fine-tuned) = {self.bound(finetuned):.1f}"

    def met(self, point: dict, finetuned: dict) -> bool:
        return point[self.keys()[0]] >= self.bound(finetuned)


def choose(
    points: list[dict], finetuned: dict | float, rule: Rule | float = 0.98
) -> tuple[dict | None, bool]:
    """(chosen point, whether it met the rule) — see the module docstring. ``finetuned``: the fine-tuned model's
    scores (or its T alone, with a ``min_task_ratio`` rule given as a number)."""
    rule = rule if isinstance(rule, Rule) else Rule(min_task_ratio=rule)
    ft = finetuned if isinstance(finetuned, dict) else {"T": finetuned}
    if not points:
        return None, False
    bounded, best = rule.keys()
    ok = [p for p in points if rule.met(p, ft)]
    if ok:
        return max(ok, key=lambda p: (p[best], p[bounded], -points.index(p))), True
    return max(points, key=lambda p: (p[bounded], p[best], -points.index(p))), False


def _grid_for(method: str, accepted: set[str], params: list[tuple[str | None, str, list[float]]]):
    out = []
    for m, name, values in params:
        if m is not None and m != method:
            continue
        if name not in accepted:
            if m is not None:
                raise ForgetlessError(
                    f"method {method!r} has no parameter {name!r}",
                    remedy=f"its parameters: {', '.join(sorted(accepted))}",
                )
            continue
        out.append((name, values))
    return out


def _accuracy(result: dict) -> dict[str, float]:
    return {n: 100.0 * t["accuracy"] for n, t in result["tasks"].items()}


def sweep(
    recipes: Sequence[dict | str | Path],
    params: Sequence[str],
    *,
    tasks: dict[str, Any],
    general: dict[str, Any],
    workdir: str | Path,
    split: str = "val",
    limit: int | None = None,
    min_task_ratio: float = 0.98,
    plot: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    rule: Rule | None = None,
    held_out: dict[str, dict[str, Any]] | None = None,
    dtype: str = "float32",
    device: str = "auto",
    log: Callable[[str], None] | None = print,
) -> dict:
    """Run the grid (module docstring); returns ``{"points", "base", "finetuned", "chosen", "rule", ...}``.
    ``rule`` (default: ``min_task_ratio``'s); ``held_out``: {"split": name, "tasks": …, "general": …} — the
    chosen point, the base and the fine-tuned model evaluated there too (``result["held_out"]``). ``dtype`` and
    ``device``: the evaluations' (cached apart per dtype)."""
    from ..methods.registry import METHODS
    from ..recipe import load_recipe

    rule = rule or Rule(min_task_ratio=min_task_ratio)
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
            raise ForgetlessError(
                "a sweep recipe merges one fine-tuned model into its base", remedy="give one model"
            )
        m = METHODS[d["method"]]
        accepted = set(m.params)
        g = _grid_for(m.name, accepted, grid)
        if not g:
            raise ForgetlessError(
                f"no --param applies to method {d['method']!r}",
                remedy=f"its parameters: {', '.join(sorted(accepted))}",
            )
        loaded.append((d, g))
    from ..stats.run import resolve_device

    options = EvalOptions(split=split, limit=limit, batch_size=batch_size, dtype=dtype, device=device)
    with process_group(resolve_device(device)) as (rank, _world):  # under torchrun: one group, rank 0 writes
        runs = _Grid(tasks, general, workdir, options, say if rank == 0 else (lambda _s: None), rank)
        return _run_grid(loaded, runs, rule=rule, held_out=held_out, plot=plot, out=out)


@dataclass
class _Grid:
    """A sweep's evaluations: cached, data-parallel under torchrun; each point merged by rank 0 into a scratch
    folder that every rank evaluates."""

    tasks: dict[str, Any]
    general: dict[str, Any]
    workdir: Path
    options: EvalOptions  # split, limit, batch_size, dtype, device
    say: Callable[[str], None]
    rank: int

    def evaluate(self, model: Path, where: dict | None = None) -> dict:
        from .cache import cached_evaluate

        o = self.options
        w = where or {"split": o.split, "tasks": self.tasks, "general": self.general}
        r, cached = cached_evaluate(
            model,
            w["tasks"],
            w["general"],
            cache_dir=self.workdir / "eval-cache",
            split=w["split"],
            limit=o.limit,
            batch_size=o.batch_size,
            dtype=o.dtype,
            device=o.device,
            log=None,
        )
        self.say(f"  evaluated {model}{' (cached)' if cached else ''}: {r['scores']}")
        return r

    def merged(self, rec: dict, folder: Path, where: dict | None = None) -> dict:
        """Merge `rec` into a scratch folder (rank 0), evaluate it (every rank), remove it (rank 0)."""
        import forgetless

        if self.rank == 0:
            forgetless.merge(rec, out=folder, force=True, progress=False, log=None)
        barrier()
        try:
            return self.evaluate(folder, where)
        finally:
            barrier()
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)


def _run_grid(
    loaded: list,
    grid: _Grid,
    *,
    rule: Rule,
    held_out: dict[str, dict[str, Any]] | None,
    plot: str | Path | None,
    out: str | Path | None,
) -> dict:
    """Evaluate the base, the fine-tuned model and every point of the grid; choose; plot and write (rank 0)."""
    from .metrics import Bootstrap, compare
    from .report import format_table, write_json

    say, split = grid.say, grid.options.split
    first = loaded[0][0]
    base = Path(first["base"])
    m0 = first["models"][0]
    ft = Path(m0["model"] if isinstance(m0, dict) else m0)
    base_r, ft_r = grid.evaluate(base), grid.evaluate(ft)
    boot = Bootstrap()  # 95% intervals, E and F paired with the base's items
    points, point_recipes = _points(grid, loaded, base_r, ft_r, boot)
    ft_scores = compare(ft_r, base_r, ft_r)
    chosen, met = choose(points, ft_scores, rule)
    stated = rule.describe(ft_scores)
    rows = [
        {
            "method": "base",
            "knob": "",
            **compare(base_r, base_r, ft_r),
            "accuracy": _accuracy(base_r),
            "intervals": boot.intervals(boot.compare(base_r, base_r)),
        },
        {
            "method": "fine-tuned",
            "knob": "",
            **ft_scores,
            "accuracy": _accuracy(ft_r),
            "intervals": boot.intervals(boot.compare(ft_r, base_r)),
        },
        *points,
    ]
    say(format_table([{"name": f"{r['method']} {r['knob']}".strip(), **r} for r in rows]))
    if chosen is not None:
        say(
            f"chosen ({stated}{'' if met else f'; no point met it, highest {rule.keys()[0]} instead'}): "
            f"{chosen['method']} {chosen['knob']}: T {chosen['T']:.1f}, G {chosen['G']:.1f}, E {chosen['E']:+.1f}, "
            f"F {chosen['F']:+.1f}"
        )
    result = {
        "split": split,
        "limit": grid.options.limit,
        "rule": stated,
        "rule_met": met,
        "chosen": chosen,
        "base": compare(base_r, base_r, ft_r),
        "finetuned": ft_scores,
        "points": points,
    }
    if held_out and chosen is not None:
        rec = point_recipes[next(i for i, p in enumerate(points) if p is chosen)]
        result["held_out"] = _held_out(
            rec, base, ft, held_out, rule, grid.workdir, grid.merged, grid.evaluate, say
        )
    if plot and grid.rank == 0:
        _plot(result, rows, points, chosen, plot, f"trade-off on {split} ({', '.join(grid.tasks)})")
        result["plot"] = str(plot)
    if out and grid.rank == 0:
        write_json(out, result)
    return result


def _points(grid: _Grid, loaded: list, base_r: dict, ft_r: dict, boot: Any) -> tuple[list[dict], list[dict]]:
    """Every grid point merged and scored (E and F paired with the base), and the recipe each merged."""
    from .metrics import compare

    points: list[dict] = []
    recipes: list[dict] = []
    for d, g in loaded:
        for name, values in g:
            for v in values:
                rec = copy.deepcopy(d)
                rec.setdefault("parameters", {})[name] = v
                grid.say(f"{d['method']} {name}={v:g}: merging")
                r = grid.merged(rec, grid.workdir / "merged" / f"{d['method']}-{name}-{v:g}")
                recipes.append(rec)
                points.append(
                    {
                        "method": d["method"],
                        "param": name,
                        "value": v,
                        "knob": f"{name}={v:g}",
                        **compare(r, base_r, ft_r),
                        "accuracy": _accuracy(r),
                        "intervals": boot.intervals(boot.compare(r, base_r)),
                    }
                )
    return points, recipes


def _plot(
    result: dict, rows: list[dict], points: list[dict], chosen: dict | None, plot: str | Path, title: str
) -> None:
    """The trade-off plot: base, fine-tuned and every point, with their intervals, the chosen one marked."""
    from .report import tradeoff_plot

    bars = [{"task_interval": r["intervals"]["T"], "general_interval": r["intervals"]["G"]} for r in rows]
    pts = [
        {
            "method": "base",
            "task": result["base"]["T"],
            "general": result["base"]["G"],
            "role": "base",
            **bars[0],
        },
        {
            "method": "fine-tuned",
            "task": result["finetuned"]["T"],
            "general": result["finetuned"]["G"],
            "role": "finetuned",
            **bars[1],
        },
    ]
    pts += [
        {
            "method": p["method"],
            "task": p["T"],
            "general": p["G"],
            "knob": p["value"],
            "chosen": p is chosen,
            **b,
        }
        for p, b in zip(points, bars[2:])
    ]
    tradeoff_plot(pts, plot, title=title)


def _held_out(
    rec: dict, base: Path, ft: Path, where: dict, rule: Rule, workdir: Path, merged, evaluate, say
) -> dict:
    """The chosen point's recipe `rec` merged again and evaluated on the held-out split with the base and the
    fine-tuned model: its scores with 95% intervals (E and F paired with the base there) and whether the target
    holds there."""
    from .metrics import Bootstrap, compare

    r = merged(rec, workdir / "merged" / f"held-out-{rec['method']}", where)
    base_r, ft_r = evaluate(base, where), evaluate(ft, where)
    boot = Bootstrap()
    got = {**compare(r, base_r, ft_r), "intervals": boot.intervals(boot.compare(r, base_r))}
    ft_scores = compare(ft_r, base_r, ft_r)
    got["finetuned"] = ft_scores
    got["rule_met"] = rule.met(got, ft_scores)
    iv = got["intervals"]
    say(
        f"on {where['split']} (held out): E {got['E']:+.1f} [{iv['E'][0]:+.1f}, {iv['E'][1]:+.1f}], "
        f"F {got['F']:+.1f} [{iv['F'][0]:+.1f}, {iv['F'][1]:+.1f}] (fine-tuned: E {ft_scores['E']:+.1f}, "
        f"F {ft_scores['F']:+.1f}); the target {'holds' if got['rule_met'] else 'does not hold'} there"
    )
    return {"split": where["split"], **got}
