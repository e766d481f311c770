"""What a merge reports: tensors and bytes per route and part, the method's element counts, and the model card
written beside the weights (README.md), so that a merged folder says how it was made."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import __version__
from ..checkpoint.writer import human_bytes

if TYPE_CHECKING:
    from .plan import Job, Plan


class Count(NamedTuple):
    """Tensors and their output bytes: one row of the route table."""

    tensors: int
    nbytes: int


def tally(jobs: Iterable[Job], key: Callable[[Job], Any]) -> dict[Any, Count]:
    """key(job) -> the tensors and output bytes of the jobs with that key."""
    out: dict[Any, Count] = {}
    for j in jobs:
        n, size = out.get(key(j), Count(0, 0))
        out[key(j)] = Count(n + 1, size + j.out_bytes)
    return out


def route_table(jobs: list[Job], label: Callable[[Job], str]) -> str:
    """Tensors and bytes per route, and per part and route (`label` names a job's route)."""
    by_route = tally(jobs, label)
    by_part = tally(jobs, lambda j: (j.part, label(j)))
    out = [f"{'route':<18} {'tensors':>8} {'bytes':>12}"]
    out += [f"{r:<18} {c:>8} {human_bytes(b):>12}" for r, (c, b) in sorted(by_route.items())]
    out += [
        f"{'total':<18} {len(jobs):>8} {human_bytes(sum(j.out_bytes for j in jobs)):>12}",
        "",
        f"{'part':<18} {'route':<18} {'tensors':>8} {'bytes':>12}",
    ]
    out += [f"{p:<18} {r:<18} {c:>8} {human_bytes(b):>12}" for (p, r), (c, b) in sorted(by_part.items())]
    return "\n".join(out)


def counts_table(counts: dict[str, Counter]) -> str:
    """Elements per part and kind (kept / reverted / mixed …), as the method reported them; '' when none."""
    kinds = sorted({k for c in counts.values() for k in c})
    if not kinds:
        return ""
    lines = ["", f"{'part':<18} " + " ".join(f"{k:>21}" for k in kinds)]
    for part, c in sorted(counts.items()):
        total = sum(c.values()) or 1
        lines.append(f"{part:<18} " + " ".join(f"{c[k]:>12,} ({100 * c[k] / total:5.1f}%)" for k in kinds))
    return "\n".join(lines)


@dataclass
class MergeReport:
    """What :func:`forgetless.merge` returns: the output, its plan, the time taken and the method's counts."""

    out: Path | None
    plan: Plan
    seconds: float = 0.0
    dry_run: bool = False
    counts: dict[str, Counter] = field(default_factory=dict)  # part -> element counts reported by the method

    @property
    def routes(self) -> dict[str, Count]:
        """Route -> tensors and output bytes."""
        return self.plan.totals()

    def summary(self) -> str:
        head = "dry run: nothing written" if self.dry_run else f"wrote {self.out} in {self.seconds:.1f} s"
        return "\n".join(filter(None, [head, self.plan.table(), counts_table(self.counts)]))


def model_card(plan: Plan, counts: dict[str, Counter] | None = None) -> str:
    """README.md of the output: the method, the recipe, every input's fingerprints, the statistics used, and
    what each tensor took."""
    return f"""---
tags: [forgetless, merge, {plan.spec.name}]
---
# Merged with forgetless {__version__}

Method **{plan.spec.name}**: {plan.spec.doc}
{plan.card_note()}
## Recipe

```yaml
{plan.recipe.to_yaml().rstrip()}
```

## Inputs

| role | reference | structure fingerprint | weights fingerprint (sampled) |
|---|---|---|---|
{_input_rows(plan)}
{_statistics_section(plan)}{_parts_section(plan)}
## What each tensor took

```
{plan.table()}
{counts_table(counts or {})}
```
"""


def _input_rows(plan: Plan) -> str:
    """One table row per input model: its role, reference and fingerprints."""
    r = plan.recipe
    inputs = [("base", r.base, plan.base)] + [
        (f"models[{i}]", m.model, rd) for i, (m, rd) in enumerate(zip(r.models, plan.models))
    ]
    return "\n".join(
        f"| {label} | `{ref}` | `{rd.fingerprint()}` | "
        f"`{getattr(rd, 'weights_fingerprint', rd.fingerprint)()}` |"
        for label, ref, rd in inputs
    )


def _parts_section(plan: Plan) -> str:
    """The values given per part, by entry, and the tensors that took each; '' without any."""
    table = plan.parts()
    return f"\n## Parameters per part\n\n```\n{table}\n```\n" if table else ""


def _statistics_section(plan: Plan) -> str:
    """The statistics table (role, files, kind, samples); '' without statistics."""
    rows = []
    for need, v in plan.stats.items():
        for rd in v if isinstance(v, list) else [v]:
            meta = rd.meta
            files = ", ".join(f"`{p}`" for p in rd.paths)
            rows.append(f"| {need} | {files} | {meta.get('kind', '?')} | N={meta.get('num_samples', '?')} |")
    if not rows:
        return ""
    return "\n## Statistics\n\n| role | file | kind | samples |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
