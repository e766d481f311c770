"""Text knowledge probes: easy four-option questions that measure what the language model knows *before* training.

The probes are the testbed's "general text" knowledge: a model fine-tuned on a downstream task should keep
answering them as well as the base model did. There are four categories of roughly equal size:

- ``world``: capitals, landmarks' countries, continents, languages, currencies, basic history and geography;
- ``science``: everyday science (water, planets, animals, the body, plants, weather, materials, simple physics);
- ``arithmetic``: one- and two-digit ``+``, ``-`` and ``×`` with small results, generated from a fixed seed, with
  wrong answers close to the right one;
- ``words``: opposites, synonyms, young animals, plurals and what a word means.

The hand-written questions are package data, ``probes.tsv`` (:func:`written_facts`); the arithmetic ones are
generated (:func:`arithmetic_facts`). Each probe is ``{"id", "question", "answer", "options", "category"}``: a
chat question and four distinct options of the same kind, one of them the answer. A probe is scored as multiple
choice: each option is rendered as the assistant's answer to the question with the model's chat template; its
score is the sum of the log-probs of the tokens :class:`forgetless.stats.data.Encoder` labels (the option and the
end-of-turn token after it); the prediction is the option with the highest score (:func:`option_scores`).

Two choices of format make that score measure knowledge rather than style, for a 135M chat model that otherwise
answers in full sentences ("The capital of Japan is Tokyo."), so that a bare "Tokyo" and the end of turn right
after it are unlikely whatever the option:

- text questions end with how long the answer is: "Answer in one or two words." when no option is longer, else
  "Answer in a few words." (on the three text categories the base model scores about 48% with bare questions,
  62% with this);
- arithmetic options are the equation the model writes itself, ``7 + 5 = 12``: all options share the ``7 + 5 =``
  prefix, so only the number separates them (bare numbers: 35%, barely above chance).

The *content* of the probes (questions, answers, options, ids) is fixed; ``seed`` only shuffles the order of each
probe's options and of the list, so scores and accuracies do not depend on it. Probes were not selected by whether
the model answers them (that would bias the forgetting measurement); a few were reworded only where a distractor
could be argued to be right.

The probes are never trained on, so :func:`split_probes` gives an empty ``train`` split: ``val`` (60 probes, for
choosing hyper-parameters) and ``test`` (the rest), stratified by category.

Accuracy of the embedded SmolLM2-135M-Instruct before any training, all probes (chance is 25%)::

    category    accuracy  probes
    world         64.7%      102
    science       55.4%       92
    arithmetic    74.0%       96   (+ 23/32, - 18/32, × 30/32)
    words         66.3%       95
    overall       65.2%      385

measured on CPU with ``OMP_NUM_THREADS=1 python -m forgetless.testbed.probes`` (:func:`probe_accuracy`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError

CATEGORIES = ("world", "science", "arithmetic", "words")
N_OPTIONS = 4
N_VAL = 60
SHORT_ANSWER = "Answer in one or two words."
PHRASE_ANSWER = "Answer in a few words."
ARITHMETIC_SEED = 20240607  # fixes the generated arithmetic questions; independent of the shuffling seed

# (question, answer, three wrong options of the same kind)
Fact = tuple[str, str, str, str, str]
WRITTEN = Path(__file__).with_name("probes.tsv")  # the hand-written categories' questions (package data)


def written_facts(path: Path = WRITTEN) -> dict[str, list[Fact]]:
    """The hand-written questions by category, in file order (which fixes their ids): one tab-separated line each,
    ``category, question, answer, wrong, wrong, wrong``; ``#`` lines are comments."""
    tables: dict[str, list[Fact]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            category, *fact = line.split("\t")
            tables.setdefault(category, []).append(tuple(fact))  # shape checked by _check
    return tables


# ----------------------------------------------------------------------------------------------------------------
# arithmetic


def _near(answer: int, offsets: Sequence[int], rng: random.Random) -> list[int]:
    """Three distinct non-negative wrong answers ``answer + offset``, offsets tried in a seeded order."""
    cands = [answer + d for d in offsets if d != 0 and answer + d >= 0]
    rng.shuffle(cands)
    out = list(dict.fromkeys(cands))[:3]
    assert len(out) == 3, (answer, offsets)
    return out


def arithmetic_facts(n_add: int = 32, n_sub: int = 32, n_mul: int = 32) -> list[Fact]:
    """Generated arithmetic questions, the same on every call: ``a + b`` (1-20 each), ``a - b`` (2-30, result
    0-19), ``a × b`` (2-9 each). The question is ``What is a + b?``; each option is the equation the model would
    write, ``a + b = n``, with the true ``n`` or a close wrong one (±1, ±2, ±10; for products also ± one factor).
    The options share the ``a + b =`` prefix, so only the number (and the end of turn) separates their scores."""
    rng = random.Random(ARITHMETIC_SEED)
    seen: set[tuple[str, int, int]] = set()
    facts: list[Fact] = []
    for op, count in (("+", n_add), ("-", n_sub), ("×", n_mul)):
        k = 0
        while k < count:
            if op == "+":
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                ans, offsets = a + b, (-10, -2, -1, 1, 2, 10)
            elif op == "-":
                a = rng.randint(2, 30)
                b = rng.randint(1, a)
                if a - b >= 20:
                    continue
                ans, offsets = a - b, (-10, -2, -1, 1, 2, 10)
            else:
                a, b = rng.randint(2, 9), rng.randint(2, 9)
                ans, offsets = a * b, (-a, a, -b, b, -1, 1)
            if (op, a, b) in seen:
                continue
            seen.add((op, a, b))
            expr = f"{a} {op} {b}"
            options = [f"{expr} = {n}" for n in (ans, *_near(ans, offsets, rng))]
            facts.append((f"What is {expr}?", *options))
            k += 1
    return facts


# ----------------------------------------------------------------------------------------------------------------
# building and splitting


def _check(category: str, facts: list[Fact]) -> None:
    """Refuses a malformed table (a programming error, so an assertion): four distinct options, unique questions."""
    questions = Counter(f[0] for f in facts)
    dup = [q for q, c in questions.items() if c > 1]
    assert not dup, f"{category}: duplicate questions {dup}"
    for f in facts:
        assert len(f) == 1 + N_OPTIONS and len(set(f[1:])) == N_OPTIONS, f"{category}: bad options in {f}"


def instruction(options: Sequence[str]) -> str:
    """What the question asks of the answer's length, so that a short answer followed by the end of the turn is
    what the model expects (a small chat model otherwise answers in a sentence): one or two words when every
    option has at most two, else a few words."""
    if max(len(o.split()) for o in options) <= 2:
        return " " + SHORT_ANSWER
    return " " + PHRASE_ANSWER


def text_probes(seed: int = 0) -> list[dict[str, Any]]:
    """All probes, as dicts ``{"id", "question", "answer", "options", "category"}``.

    Ids (``world-000`` …) and contents are fixed; ``seed`` shuffles each probe's options and the order of the
    list, deterministically.
    """
    tables = {**written_facts(), "arithmetic": arithmetic_facts()}
    assert set(tables) == set(CATEGORIES), sorted(tables)
    rng = random.Random(seed)
    probes = []
    for category in CATEGORIES:
        facts = tables[category]
        _check(category, facts)
        for i, (question, answer, *wrong) in enumerate(facts):
            options = [answer, *wrong]
            if category != "arithmetic":
                question += instruction(options)
            rng.shuffle(options)
            probes.append(
                {
                    "id": f"{category}-{i:03d}",
                    "question": question,
                    "answer": answer,
                    "options": options,
                    "category": category,
                }
            )
    rng.shuffle(probes)
    return probes


def split_probes(
    probes: Sequence[dict[str, Any]], seed: int = 0, *, n_val: int = N_VAL
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [], "val": [...], "test": [...]}``: ``n_val`` probes for validation, the rest for test.

    The probes measure retained knowledge and are never trained on, so ``train`` is always empty. The split is
    stratified: each category gives ``val`` its share of ``n_val`` (largest remainders settle rounding). Which
    probes go where depends only on the probes' ids and ``seed``, not on the order they are passed in.
    """
    ids = Counter(p["id"] for p in probes)
    dup = sorted(i for i, c in ids.items() if c > 1)
    if dup:
        raise ForgetlessError(f"duplicate probe ids {dup[:5]}", remedy="pass each probe once")
    if not 0 <= n_val <= len(probes):
        raise ForgetlessError(
            f"cannot take {n_val} validation probes from {len(probes)}",
            remedy=f"pass n_val between 0 and {len(probes)}",
        )
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(probes, key=lambda p: p["id"]):
        by_cat.setdefault(p["category"], []).append(p)
    cats = sorted(by_cat)
    exact = {c: n_val * len(by_cat[c]) / len(probes) for c in cats}
    quota = {c: int(exact[c]) for c in cats}
    for c in sorted(cats, key=lambda c: (-(exact[c] - quota[c]), c))[: n_val - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    val: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for c in cats:
        group = list(by_cat[c])
        rng.shuffle(group)
        val += group[: quota[c]]
        test += group[quota[c] :]
    rng.shuffle(val)
    rng.shuffle(test)
    return {"train": [], "val": val, "test": test}


# ----------------------------------------------------------------------------------------------------------------
# measuring a model


def probe_accuracy(
    model_dir: str | Path | None = None,
    probes: Sequence[dict[str, Any]] | None = None,
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """Multiple-choice accuracy per category and ``"overall"`` of a model folder (default: the embedded
    SmolLM2-135M-Instruct) on ``probes`` (default: all of :func:`text_probes`), scored by the evaluation
    harness (:func:`forgetless.eval.harness.score_options`)."""
    import torch

    from ..embedded import export_smollm2
    from ..eval.harness import score_options
    from ..stats.data import Encoder, Sample
    from ..stats.run import load_model

    model_dir = Path(model_dir) if model_dir is not None else export_smollm2()
    probes = list(probes) if probes is not None else text_probes()
    model, _ = load_model(model_dir, "cpu", "float32")
    samples = [
        Sample(
            p["id"], None, [("user", p["question"]), ("assistant", p["answer"])], options=tuple(p["options"])
        )
        for p in probes
    ]
    encoder = Encoder(model_dir)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    with torch.no_grad():
        for k in range(0, len(samples), batch_size):
            chunk = samples[k : k + batch_size]
            scored = score_options(model, encoder, chunk, batch_size, tail=False)  # acc only
            for p, sc in zip(probes[k : k + batch_size], scored):
                total[p["category"]] += 1
                right[p["category"]] += p["options"][sc.predicted] == p["answer"]
    acc = {c: right[c] / total[c] for c in CATEGORIES if total[c]}
    acc["overall"] = sum(right.values()) / sum(total.values())
    return acc


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    all_probes = text_probes()
    counts = Counter(p["category"] for p in all_probes)
    for name, value in probe_accuracy(probes=all_probes).items():
        n = counts[name] if name in counts else len(all_probes)
        print(f"{name:<11} {value:6.1%}  ({n} probes)")
