"""MME and POPE: yes/no questions about an image, read from the files their maintainers publish and scored as
their official tools score them.

MME (``MME_Benchmark_release_version``): one folder per category; in each, per image, a text file of two
``question<TAB>Yes|No`` lines, beside the image or in ``questions_answers_YN/`` beside ``images/``. Scored as the
MME eval tool's ``calculation.py`` does: per category ``acc`` (questions right) and ``acc+`` (images with both
right), score ``100·(acc + acc+)``, summed over the 10 perception and the 4 cognition categories. A unit is an
image (its two questions).

POPE (``coco_pope_{adversarial,popular,random}.json``, JSON lines, with the COCO ``val2014`` images): scored as
LLaVA's ``llava/eval/eval_pope.py`` (the same rule as POPE's own ``evaluate.py``) does, per split: accuracy,
precision, recall, F1 and the share of "yes" answers. A unit is a question.

The prompts are those of LLaVA-1.5's ``scripts/v1_5/eval/{mme,pope}.sh`` (``llava_mme.jsonl``,
``llava_pope_test.jsonl``): the question, a line break and "Answer the question using a single word or phrase."
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ...errors import ForgetlessError
from ...safeload import parse_json, read_text
from . import SHORT_ANSWER, Benchmark, Item, Scored, by_unit, register

MME_ASKS = "Please answer yes or no."
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_CATEGORIES = MME_PERCEPTION + MME_COGNITION
MME_SCALE = 200.0 * len(MME_CATEGORIES)  # the largest total: every category's acc and acc+ at 100
MME_ROOTS = (
    ".",
    "MME_Benchmark_release_version",
    "MME_Benchmark",
    "MME_Benchmark_release_version/MME_Benchmark",
)
MME_LAYOUT = (
    "pass --benchmark-dir MME_Benchmark_release_version, the folder holding existence/, count/, … "
    "(see docs/benchmarks.md)"
)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
POPE_SPLITS = ("adversarial", "popular", "random")
POPE_LAYOUT = (
    "put coco_pope_{adversarial,popular,random}.json in DIR/coco/ (or DIR) and the COCO val2014 images in "
    "DIR/val2014/ (see docs/benchmarks.md)"
)
POPE_KEYS = ("question_id", "image", "text", "label")


def with_suffix(question: str) -> str:
    """The user turn of LLaVA-1.5's short-answer evaluation scripts."""
    return f"{question}\n{SHORT_ANSWER}"


def mme_prompt(question: str) -> str:
    """MME's question as ``llava_mme.jsonl`` asks it: without its "Please answer yes or no."
    (``convert_answer_to_mme.py`` puts it back to find the ground truth), stripped, with the short-answer
    suffix."""
    return with_suffix(question.replace(MME_ASKS, "").strip())


# ----------------------------------------------------------------------------------------------------------------
# MME: reading


def read_mme(folder: Path) -> list[Item]:
    """Every MME question, category by category in the eval tool's order, images in file-name order."""
    root = _mme_root(folder)
    return [item for category in MME_CATEGORIES for item in _mme_category(root, category)]


def _mme_root(folder: Path) -> Path:
    """The folder holding the category folders: ``folder`` itself or the release folder inside it."""
    for sub in MME_ROOTS:
        if (folder / sub / MME_CATEGORIES[0]).is_dir():
            return (folder / sub).resolve()
    raise ForgetlessError(
        f"no MME category folders ({MME_CATEGORIES[0]}/, …, {MME_CATEGORIES[-1]}/) in the benchmark folder",
        file=folder,
        remedy=MME_LAYOUT,
    )


def _mme_category(root: Path, category: str) -> list[Item]:
    """A category's questions: its text files in ``questions_answers_YN/`` (images in ``images/``) or beside the
    images."""
    folder = root / category
    split = (folder / "images").is_dir()
    questions = folder / "questions_answers_YN" if split else folder
    files = sorted(questions.glob("*.txt")) if questions.is_dir() else []
    if not files:
        raise ForgetlessError(
            f"MME category {category!r} has no question files (*.txt)", file=questions, remedy=MME_LAYOUT
        )
    images = folder / "images" if split else folder
    return [item for f in files for item in _mme_image(root, category, f, _image_of(f, images))]


def _image_of(txt: Path, images: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (images / f"{txt.stem}{suffix}").is_file():
            return images / f"{txt.stem}{suffix}"
    raise ForgetlessError(
        f"no image {txt.stem}.jpg or {txt.stem}.png in {images} for these questions",
        file=txt,
        remedy=MME_LAYOUT,
    )


def _mme_image(root: Path, category: str, txt: Path, image: Path) -> list[Item]:
    """An image's two questions; its unit is the image's path in the release folder (LLaVA's question id)."""
    unit = image.relative_to(root).as_posix()
    return [
        Item(
            id=f"{unit}#{k}",
            image=image,
            turns=[("user", mme_prompt(question)), ("assistant", answer)],
            source=txt,
            index=k,
            unit=unit,
            meta={"category": category, "label": answer.lower()},
        )
        for k, (question, answer) in enumerate(_mme_lines(txt), 1)
    ]


def _mme_lines(txt: Path) -> list[tuple[str, str]]:
    """The (question, Yes|No) lines of an MME question file: two, as the eval tool pairs them."""
    remedy = "an MME question file has two lines 'question<TAB>Yes' or 'question<TAB>No'"
    rows = []
    for n, line in enumerate(read_text(txt, remedy=remedy).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
            raise ForgetlessError(f"line {n} is not 'question<TAB>Yes|No'", file=txt, remedy=remedy)
        rows.append((fields[0], fields[1]))
    if len(rows) != 2:
        raise ForgetlessError(
            f"{len(rows)} questions, not the two MME asks per image", file=txt, remedy=remedy
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# MME: scoring


def mme_answer(text: str) -> str:
    """``yes``, ``no`` or ``other``, as ``calculation.py``'s ``parse_pred_ans`` reads an answer: lowercased (its
    line breaks deleted, as the tool's readme asks), "yes" if within its first four characters, else "no" if
    there, else "other" (counted wrong)."""
    head = text.replace("\n", "").lower()[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(items: list[Item], predictions: list[str]) -> Scored:
    """Per category acc, acc+ and score; the perception and cognition sums and their total. A unit's value is its
    image's part of the total, over :data:`MME_SCALE`: their mean × ``MME_SCALE`` is the total."""
    parsed = [mme_answer(p) for p in predictions]
    right = [a == it.meta["label"] for it, a in zip(items, parsed)]
    units = by_unit(items, [float(r) for r in right])
    category = {it.unit: it.meta["category"] for it in items}
    images = {c: [v for u, v in units.items() if category[u] == c] for c in MME_CATEGORIES}
    other = Counter(it.meta["category"] for it, a in zip(items, parsed) if a == "other")
    per = {c: _mme_figures(flags, other[c]) for c, flags in images.items() if flags}
    values = [_mme_value(v, len(units) / len(images[category[u]])) for u, v in units.items()]
    perception = sum(f["score"] for c, f in per.items() if c in MME_PERCEPTION)
    cognition = sum(f["score"] for c, f in per.items() if c in MME_COGNITION)
    official = {"total": perception + cognition, "perception": perception, "cognition": cognition}
    return Scored(values, right, {**official, "categories": per})


def _mme_value(flags: Sequence[float], weight: float) -> float:
    """An image's part of the total over :data:`MME_SCALE`: ``100·(right/2 + both right)/images of its category``,
    times the number of images, over the scale (the mean over images then gives total/scale)."""
    return weight * 100.0 * (sum(flags) / 2 + float(all(flags))) / MME_SCALE


def _mme_figures(images: list[list[float]], other: int) -> dict[str, float]:
    """What ``calculation.py`` computes for a category from its images' right/wrong flags: acc (over its
    questions), acc+ (over its images), score; and how many answers were neither yes nor no."""
    acc = sum(map(sum, images)) / sum(map(len, images))
    acc_plus = sum(all(v) for v in images) / len(images)
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc * 100 + acc_plus * 100,
        "images": len(images),
        "other": other,
    }


# ----------------------------------------------------------------------------------------------------------------
# POPE


def read_pope(folder: Path) -> list[Item]:
    """The three splits' questions in file order (adversarial, popular, random), with their COCO images."""
    folder = folder.resolve()
    annotations = folder / "coco" if (folder / "coco").is_dir() else folder
    images = folder / "val2014"
    files = [_pope_file(annotations, split) for split in POPE_SPLITS]
    if not images.is_dir():
        raise ForgetlessError("no val2014/ folder of COCO images", file=folder, remedy=POPE_LAYOUT)
    return [item for split, f in zip(POPE_SPLITS, files) for item in _pope_items(split, f, images)]


def _pope_file(annotations: Path, split: str) -> Path:
    path = annotations / f"coco_pope_{split}.json"
    if not path.is_file():
        raise ForgetlessError(f"no coco_pope_{split}.json", file=annotations, remedy=POPE_LAYOUT)
    return path


def _pope_items(split: str, path: Path, images: Path) -> list[Item]:
    """A split's questions, one JSON object a line: question_id, image, text, label (yes/no)."""
    items, seen = [], set()
    lines = read_text(path, remedy=POPE_LAYOUT).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _pope_record(path, n, line)
        uid = f"{split}/{rec['question_id']}"
        if uid in seen:
            raise ForgetlessError(
                f"line {n}: question_id {rec['question_id']} given twice", file=path, remedy=POPE_LAYOUT
            )
        seen.add(uid)
        items.append(
            Item(
                id=uid,
                image=images / rec["image"],
                turns=[("user", with_suffix(rec["text"])), ("assistant", rec["label"])],
                source=path,
                index=n,
                unit=uid,
                meta={"split": split, "label": rec["label"]},
            )
        )
    return items


def _pope_record(path: Path, n: int, line: str) -> dict:
    remedy = f"fix line {n}: one JSON object a line with {', '.join(POPE_KEYS)} (label yes or no)"
    rec = parse_json(line, file=path, remedy=remedy)
    if not isinstance(rec, dict) or any(k not in rec for k in POPE_KEYS):
        raise ForgetlessError(f"line {n} lacks one of {', '.join(POPE_KEYS)}", file=path, remedy=remedy)
    if (
        rec["label"] not in ("yes", "no")
        or not isinstance(rec["image"], str)
        or not isinstance(rec["text"], str)
    ):
        raise ForgetlessError(
            f"line {n}: a label other than yes/no, or a non-text image or text", file=path, remedy=remedy
        )
    return rec


def pope_answer(text: str) -> str:
    """``yes`` or ``no`` as ``eval_pope.py`` reads an answer: its first sentence (up to the first "."), commas
    removed, split at spaces; "no" if one of the words is "No", "not" or "no", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def score_pope(items: list[Item], predictions: list[str]) -> Scored:
    """Per split ``eval_pope.py``'s figures and their mean over the splits (LLaVA-1.5 quotes the mean F1); a
    unit's value is whether its answer is right, so their mean is the accuracy over all questions."""
    parsed = [pope_answer(p) for p in predictions]
    right = [a == it.meta["label"] for it, a in zip(items, parsed)]
    splits = {
        s: _pope_figures([(it.meta["label"], a) for it, a in zip(items, parsed) if it.meta["split"] == s])
        for s in POPE_SPLITS
        if any(it.meta["split"] == s for it in items)
    }
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {k: sum(f[k] for f in splits.values()) / len(splits) for k in keys}
    return Scored([float(r) for r in right], right, {"mean_over_splits": mean, "splits": splits})


def _pope_figures(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """TP, FP, TN, FN ("yes" is positive), accuracy, precision, recall, F1 and the yes ratio of (label,
    prediction) pairs; a ratio with nothing to divide by is 0 (where ``eval_pope.py`` stops with an error)."""
    tp = sum(p == "yes" and t == "yes" for t, p in pairs)
    fp = sum(p == "yes" and t == "no" for t, p in pairs)
    tn = sum(p == "no" and t == "no" for t, p in pairs)
    fn = sum(p == "no" and t == "yes" for t, p in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": len(pairs),
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(pairs)),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


register(
    Benchmark(
        "mme",
        "MME (MME_Benchmark_release_version/<category>/): yes/no, two questions an image; acc + acc+",
        read_mme,
        score_mme,
        "total score (perception + cognition, of 2800)",
        scale=MME_SCALE,
        max_new_tokens=16,
    )
)
register(
    Benchmark(
        "pope",
        "POPE (coco/coco_pope_{adversarial,popular,random}.json + val2014/): F1 etc. per split",
        read_pope,
        score_pope,
        "accuracy (%, the three splits' questions; F1 in benchmarks.pope)",
        scale=100.0,
        max_new_tokens=32,
    )
)
