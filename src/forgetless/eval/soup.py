"""``forgetless soup``: the greedy soup of several fine-tunes of one base (Wortsman et al. 2022, "Model soups").

The fine-tunes are ranked by their own validation score; the soup starts from the best and each next one is added
when the uniform average of the soup with it scores at least as well as the soup without it. The result is the
``linear`` recipe of the chosen ingredients (``lambda: 1``: their uniform average) and a JSON record beside it.

The score is the task score T (the mean accuracy over the task splits, Wortsman's held-out validation accuracy),
ties broken by the general score G. With a :class:`~forgetless.eval.sweep.Rule` the points are ordered as
``sweep`` chooses between them instead: a point that meets the user's target beats one that does not; among those
that meet it, the better maximised score wins, and among those that do not, the one closer to the target. The
rule's fine-tuned reference is the best single fine-tune by T.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from .harness import EvalOptions
from .sweep import Rule

Scorer = Callable[[list[str]], dict[str, Any]]  # the ingredients' folders → {T, G, E, F, …} of their average


def _num(x: Any) -> float:
    return float("-inf") if x is None else float(x)


def order_key(rule: Rule | None, reference: dict | None) -> Callable[[dict], tuple]:
    """A point's rank (larger is better): (T, G) without a rule; with one, as :func:`~.sweep.choose` ranks."""
    if rule is None:
        return lambda p: (_num(p["T"]), _num(p.get("G")))
    bounded, best = rule.keys()

    def key(p: dict) -> tuple:
        if rule.met(p, reference or {}):
            return (1, _num(p[best]), _num(p[bounded]))
        return (0, _num(p[bounded]), _num(p[best]))

    return key


def greedy(ingredients: Sequence[str], score: Scorer, rule: Rule | None = None) -> dict[str, Any]:
    """The greedy soup: every ingredient scored alone, ranked (ties keep the given order), then added in that order
    while the soup's score does not drop. Returns ``{"soup", "singles", "steps", "score"}``."""
    singles = [score([f]) for f in ingredients]
    by_t = max(range(len(singles)), key=lambda i: (_num(singles[i]["T"]), -i))
    key = order_key(rule, singles[by_t])
    ranked = sorted(range(len(singles)), key=lambda i: key(singles[i]), reverse=True)
    soup, current = [ranked[0]], singles[ranked[0]]
    steps = [{"add": ingredients[ranked[0]], "kept": True, "score": current}]
    for i in ranked[1:]:
        candidate = score([ingredients[j] for j in [*soup, i]])
        kept = key(candidate) >= key(current)
        steps.append({"add": ingredients[i], "kept": kept, "score": candidate})
        if kept:
            soup, current = [*soup, i], candidate
    return {
        "soup": [ingredients[i] for i in soup],
        "singles": dict(zip(ingredients, singles)),
        "ranked": [ingredients[i] for i in ranked],
        "steps": steps,
        "score": current,
        "reference": ingredients[by_t],
    }


def soup_recipe(base: str | Path, ingredients: Sequence[str]) -> dict[str, Any]:
    """The linear recipe of the ingredients' uniform average."""
    return {
        "method": "linear",
        "base": str(base),
        "models": [str(f) for f in ingredients],
        "parameters": {"lambda": 1.0},
    }


class HarnessScorer:
    """Scores an average of fine-tunes with the harness on the validation splits: one folder as it is, several
    merged (their uniform average) into a scratch folder, evaluated (cached by weights digest) and removed."""

    def __init__(self, base: Path, tasks: dict, general: dict, workdir: Path, options: EvalOptions, say):
        from .sweep import _Grid

        self.base, self.workdir = base, workdir
        self.grid = _Grid(tasks, general, workdir, options, say, 0)
        self.base_result = self.grid.evaluate(base)

    def __call__(self, ingredients: list[str]) -> dict[str, Any]:
        from .metrics import compare

        if len(ingredients) == 1:
            r = self.grid.evaluate(Path(ingredients[0]))
        else:
            r = self.grid.merged(soup_recipe(self.base, ingredients), self.workdir / "merged" / "soup")
        return {
            **compare(r, self.base_result),
            "accuracy": {n: 100.0 * t["accuracy"] for n, t in r["tasks"].items()},
        }


def greedy_soup(
    base: str | Path,
    finetuned: Sequence[str | Path],
    *,
    task: dict[str, Any],
    general: dict[str, Any] | None = None,
    out: str | Path,
    rule: Rule | None = None,
    workdir: str | Path = "runs/soup",
    options: EvalOptions | None = None,
    scorer: Scorer | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """The greedy soup (module docstring) of ``finetuned`` over ``base``, scored on ``task`` / ``general`` (name →
    task, as :func:`~forgetless.eval.harness.evaluate` takes them; split ``val`` unless ``options`` says);
    writes the linear recipe to ``out`` and the record beside it (``.json``); returns the record. ``scorer``
    replaces the harness (a function of the ingredients' folders)."""
    import yaml

    from ..checkpoint.writer import atomic_write
    from .learn import check_outputs
    from .report import write_json

    say = log or (lambda _s: None)
    names = [str(f) for f in finetuned]
    check_outputs(out, [base, *names])
    if len(names) < 2:
        raise ForgetlessError("a soup needs at least two fine-tunes", remedy="give two or more folders")
    if len(set(names)) != len(names):
        raise ForgetlessError("a fine-tune is given twice", remedy="give each folder once")
    if not task:
        raise ForgetlessError("no task to score the soup on", remedy="pass --task")
    for f in [str(base), *names]:
        if not (Path(f) / "config.json").is_file():
            raise ForgetlessError("not a model folder (no config.json)", file=f, remedy="pass model folders")
    if scorer is None:
        o = options or EvalOptions(split="val")
        scorer = HarnessScorer(Path(base), task, general or {}, Path(workdir), o, say)
    result = greedy(names, scorer, rule)
    for s in result["steps"]:
        verdict = "kept" if s["kept"] else "left out"
        say(f"  + {s['add']}: T {_num(s['score']['T']):.1f}, G {_num(s['score'].get('G')):.1f} ({verdict})")
    say(f"soup: {len(result['soup'])} of {len(names)} fine-tunes")
    reference = result["singles"][result["reference"]]
    result["rule"] = "the best T, then G" if rule is None else rule.describe(reference)
    atomic_write(out, yaml.safe_dump(soup_recipe(base, result["soup"]), sort_keys=False))
    write_json(Path(out).with_suffix(".json"), result)
    if Path(workdir, "merged").is_dir():
        shutil.rmtree(Path(workdir, "merged"), ignore_errors=True)
    return result
