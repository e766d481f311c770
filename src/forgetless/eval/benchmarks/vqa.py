"""VQAv2, TextVQA and GQA: the open-ended short-answer benchmarks, read from their maintainers' files and scored by
their official rules.

- **vqav2**: ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json`` and the COCO
  images ``<split>/COCO_<split>_<12-digit id>.jpg`` (flat as the zips unpack, or the VQA API's ``Questions/``,
  ``Annotations/``, ``Images/mscoco/<split>/``); only a split with annotations (val2014) is scored here, test-dev
  answers are the EvalAI server's. Scored as LLaVA does: the answer through LLaVA's ``EvalAIAnswerProcessor``
  (``llava/eval/m4c_evaluator.py``, applied by ``scripts/convert_vqav2_for_submission.py``), then the official
  ``VQAEval.evaluate`` (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``).
- **textvqa**: ``TextVQA_0.5.1_val.json`` + ``train_images/<image_id>.jpg``, the plain question (lmms-eval's
  default prompt); **textvqa_ocr**: LLaVA-1.5's prompts with the OCR tokens, from ``llava_textvqa_val_v051_ocr.jsonl``
  beside it. Scored by LLaVA's ``TextVQAAccuracyEvaluator`` (``m4c_evaluator.py``, run by ``eval_textvqa.py``).
- **gqa**: ``testdev_balanced_questions.json`` + ``images/<imageId>.jpg``; the answer as
  ``scripts/convert_gqa_for_eval.py`` writes it, compared by the GQA ``eval.py`` LLaVA runs.

The prompt is the question and LLaVA's short-answer suffix (``docs/Evaluation.md``, the question files of
``scripts/v1_5/eval/{vqav2,gqa,textvqa}.sh``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import ForgetlessError
from ...safeload import parse_json, read_json, read_text
from . import SHORT_ANSWER, Benchmark, Item, Scored, need_file, register

MAX_NEW_TOKENS = 16  # lmms-eval's for VQAv2 and GQA; the answer is a word or phrase
BIG = 4 << 30  # the VQAv2 annotation files are hundreds of MiB


# ----------------------------------------------------------------------------------------------------------------
# the official answer normalisation: vqaEval.py's processPunctuation / processDigitArticle (whose tables LLaVA's
# EvalAIAnswerProcessor repeats word for word)


def _one_apostrophe_less(word: str) -> list[str]:
    return [word[:i] + word[i + 1 :] for i, c in enumerate(word) if c == "'"]


# Every contraction the official table restores: each is keyed by its spellings with one apostrophe left out.
_CONTRACTED = (  # noqa: SIM905 (a table read as prose)
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas "
    "wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd "
    "you'd've you'll you're you've"
).split()
# ... and three entries of the official table that follow no rule (the last one even removes the apostrophe)
_ODD = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}
CONTRACTIONS: dict[str, str] = {
    **{bare: word for word in _CONTRACTED for bare in _one_apostrophe_less(word)},
    **_ODD,
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBERS = {"none": "0"} | {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # one mark a character, in the official order
# vqaEval's "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a lookahead that can never see "<=" where a "." is, so a period
# goes unless a digit follows it; sub() is passed re.UNICODE (32) where its count goes: at most 32 go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_AT_MOST = int(re.UNICODE)
_VQA_COMMA = re.compile(r"\d,\d")  # vqaEval's commaStrip, only ever searched for
_EVALAI_COMMA = re.compile(r"\d,+\d")  # EvalAIAnswerProcessor's "(?<=\d)(\,)+(?=\d)", likewise


def process_punctuation(text: str, comma: re.Pattern[str] = _VQA_COMMA) -> str:
    """vqaEval's processPunctuation: a mark next to a space (or any mark, once a digit-comma-digit appears
    anywhere) is deleted, any other is a space; then the periods not followed by a digit go."""
    out = text
    anywhere = comma.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if anywhere or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, _PERIODS_AT_MOST)


def process_digit_article(text: str) -> str:
    """vqaEval's processDigitArticle: lower case, number words as digits, articles dropped, contractions restored."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(text: str) -> str:
    """LLaVA's ``EvalAIAnswerProcessor``: lower case, commas and question marks gone, "'s" split off, then the
    official punctuation (with its own comma rule) and digit/article steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_one_line(text), _EVALAI_COMMA))


def leave_one_out(answer: str, humans: Sequence[str]) -> float:
    """The VQA accuracy of ``answer`` against the (normalised) human answers: for each human left out, min(1,
    #others who gave it / 3); their mean."""
    hits = [h == answer for h in humans]
    k = sum(hits)
    return sum(min(1, (k - hit) / 3) for hit in hits) / len(humans)


def vqa_accuracy(answer: str, humans: Sequence[str]) -> float:
    """``VQAEval.evaluate`` for one question: both sides on one line and stripped; when the humans disagree,
    both normalised (processPunctuation, processDigitArticle); then :func:`leave_one_out`."""
    answer, humans = _one_line(answer), [_one_line(h) for h in humans]
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(h)) for h in humans]
        answer = process_digit_article(process_punctuation(answer))
    return leave_one_out(answer, humans)


def textvqa_accuracy(answer: str, humans: Sequence[str]) -> float:
    """``TextVQAAccuracyEvaluator``: both sides through :func:`evalai_answer`, always; then :func:`leave_one_out`."""
    return leave_one_out(evalai_answer(answer), [evalai_answer(h) for h in humans])


def _most_common(answers: Sequence[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def _percent(values: Sequence[float]) -> float:
    return 100 * sum(values) / len(values)


# ----------------------------------------------------------------------------------------------------------------
# VQAv2

_VQA_REMEDY = "pass the folder holding the VQAv2 question and annotation files as the VQA site publishes them"


def _vqav2_files(folder: Path) -> tuple[str, Path, Path]:
    """The split scored (val2014 first) and its questions and annotations files."""
    places = [folder, folder / "Questions", folder / "Annotations"]
    found: dict[str, Path] = {}
    for q in (q for place in places for q in sorted(place.glob("v2_OpenEnded_mscoco_*_questions.json"))):
        found.setdefault(q.name.removeprefix("v2_OpenEnded_mscoco_").removesuffix("_questions.json"), q)
    annotations = {s: [p / f"v2_mscoco_{s}_annotations.json" for p in places] for s in found}
    # the first place holding a split's annotations wins: the comprehension writes the last place first
    scorable = {s: (found[s], a) for s, files in annotations.items() for a in files[::-1] if a.is_file()}
    if not scorable:
        raise ForgetlessError(
            f"no VQAv2 split with annotations here (questions of {', '.join(found)})"
            if found
            else "no v2_OpenEnded_mscoco_<split>_questions.json here",
            file=folder,
            remedy="test-dev and test answers are not public: score them on the EvalAI server; here give val2014's "
            "v2_OpenEnded_mscoco_val2014_questions.json and v2_mscoco_val2014_annotations.json",
        )
    split = "val2014" if "val2014" in scorable else min(scorable)
    return split, *scorable[split]


@contextmanager
def _records(file: Path, remedy: str) -> Iterator[None]:
    """A record without the fields its maintainers' format gives it is refused, naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ForgetlessError(
            f"a record lacks a field or has one of the wrong type ({type(e).__name__}: {e})",
            file=file,
            remedy=remedy,
        ) from None


def _image_dir(folder: Path, *names: str) -> Path:
    """The first of the image folders ``names`` (relative to ``folder``) that exists."""
    for n in names:
        if (folder / n).is_dir():
            return (folder / n).resolve()
    raise ForgetlessError(
        f"no image folder {' or '.join(names)} in the benchmark folder",
        file=folder,
        remedy="unpack the benchmark's images where its maintainers' layout puts them",
    )


def read_vqav2(folder: Path) -> list[Item]:
    """A VQAv2 split's questions in the questions file's order, with their ten human answers."""
    split, qfile, afile = _vqav2_files(folder)
    images = _image_dir(folder, split, f"Images/mscoco/{split}")
    questions = _field(read_json(qfile, remedy=_VQA_REMEDY, limit=BIG, expect=dict), "questions", qfile)
    annotations = _field(read_json(afile, remedy=_VQA_REMEDY, limit=BIG, expect=dict), "annotations", afile)
    with _records(afile, _VQA_REMEDY):
        by_id = {a["question_id"]: _humans(a) for a in annotations}
    with _records(qfile, _VQA_REMEDY):
        return [_vqav2_item(q, by_id, split, images, afile) for q in questions]


def _humans(a: Mapping[str, Any]) -> dict[str, Any]:
    """What an annotation gives a question: the reference answer, the ten human answers, the types."""
    humans = [h["answer"] for h in a["answers"]]
    return {"reference": a["multiple_choice_answer"], "answers": humans, **{k: a[k] for k in _VQA_TYPES}}


_VQA_TYPES = ("question_type", "answer_type")


def _vqav2_item(
    q: Mapping[str, Any], by_id: Mapping[Any, dict[str, Any]], split: str, images: Path, afile: Path
) -> Item:
    a = by_id.get(q["question_id"])
    if a is None:
        raise ForgetlessError(
            f"no annotation for question {q['question_id']}", file=afile, remedy=_VQA_REMEDY
        )
    return Item(
        id=str(q["question_id"]),
        image=images / f"COCO_{split}_{q['image_id']:012d}.jpg",
        turns=[("user", q["question"] + "\n" + SHORT_ANSWER), ("assistant", a["reference"])],
        unit=str(q["question_id"]),
        meta={k: a[k] for k in ("answers", *_VQA_TYPES)},
    )


def _field(data: Mapping[str, Any], key: str, file: Path) -> list[dict[str, Any]]:
    if not isinstance(data.get(key), list):
        raise ForgetlessError(f"no {key!r} list", file=file, remedy=_VQA_REMEDY)
    return data[key]


def score_vqav2(items: list[Item], predictions: list[str]) -> Scored:
    """``VQAEval.evaluate`` on LLaVA's submitted answers; official: its ``accuracy`` (overall, per question type,
    per answer type: percentages rounded to 2 places)."""
    values = [vqa_accuracy(evalai_answer(p), it.meta["answers"]) for it, p in zip(items, predictions)]
    return Scored(
        values,
        [v >= 1 for v in values],
        {
            "overall": round(_percent(values), 2),
            "perQuestionType": _per(items, values, "question_type"),
            "perAnswerType": _per(items, values, "answer_type"),
        },
    )


def _per(items: Sequence[Item], values: Sequence[float], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for it, v in zip(items, values):
        groups[it.meta[key]].append(v)
    return {k: round(_percent(v), 2) for k, v in groups.items()}


# ----------------------------------------------------------------------------------------------------------------
# TextVQA

_TEXTVQA_REMEDY = "pass the folder holding TextVQA_0.5.1_val.json and train_images/ as TextVQA publishes them"


def _textvqa_questions(folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    path = need_file(folder, "TextVQA_0.5.1_val.json")
    data = read_json(path, remedy=_TEXTVQA_REMEDY, limit=BIG, expect=dict)
    if not isinstance(data.get("data"), list):
        raise ForgetlessError("no 'data' list", file=path, remedy=_TEXTVQA_REMEDY)
    for q in data["data"]:
        if len(q.get("answers") or ()) != 10:  # TextVQAAccuracyEvaluator asserts ten
            raise ForgetlessError(
                f"question {q.get('question_id')} has {len(q.get('answers') or ())} answers, not 10",
                file=path,
                remedy="give the val split: its questions carry the ten human answers",
            )
    return path, data["data"]


def _textvqa_item(q: Mapping[str, Any], image: Path, prompt: str, id: str) -> Item:
    return Item(
        id=id,
        image=image,
        turns=[("user", prompt), ("assistant", _most_common(q["answers"]))],
        unit=id,
        meta={"answers": list(q["answers"])},
    )


def read_textvqa(folder: Path) -> list[Item]:
    """TextVQA val in its file's order; the prompt is lmms-eval's default: the question capitalised and the
    short-answer suffix."""
    path, questions = _textvqa_questions(folder)
    images = _image_dir(folder, "train_images")
    with _records(path, _TEXTVQA_REMEDY):
        return [
            _textvqa_item(
                q,
                images / f"{q['image_id']}.jpg",
                q["question"].capitalize() + "\n" + SHORT_ANSWER,
                str(q["question_id"]),
            )
            for q in questions
        ]


OCR_FILE = "llava_textvqa_val_v051_ocr.jsonl"


def _asked(prompt: str, file: Path, line: int) -> str:
    """The question inside one of LLaVA's TextVQA prompts, lower-cased (``eval_textvqa.prompt_processor``)."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return lines[1 if prompt.startswith("Reference OCR token:") else 0].lower()
    if len(lines) == 2:
        return lines[0].lower()
    raise ForgetlessError(
        f"line {line}: not a LLaVA TextVQA prompt (question, OCR tokens, suffix)",
        file=file,
        remedy=_OCR_REMEDY,
    )


_OCR_REMEDY = f"use {OCR_FILE} from LLaVA's eval.zip as it is"


def read_textvqa_ocr(folder: Path) -> list[Item]:
    """LLaVA-1.5's TextVQA run: the prompts of its ``llava_textvqa_val_v051_ocr.jsonl`` (question, reference OCR
    tokens, suffix), in that file's order, each scored against the annotation its image and question name (as
    ``eval_textvqa.py`` joins them: the last of equal keys wins)."""
    path, questions = _textvqa_questions(folder)
    ocr = need_file(folder, OCR_FILE)
    images = _image_dir(folder, "train_images")
    with _records(path, _TEXTVQA_REMEDY):
        by_key = {(q["image_id"], q["question"].lower()): q for q in questions}
    seen: Counter[str] = Counter()
    items = []
    for n, row in enumerate(_jsonl(ocr), 1):
        q = by_key.get((row.get("question_id"), _asked(str(row.get("text", "")), ocr, n)))
        if q is None:
            raise ForgetlessError(
                f"line {n}: no question of {path.name} has this image and question",
                file=ocr,
                remedy=_OCR_REMEDY,
            )
        qid = str(q["question_id"])
        seen[qid] += 1
        item_id = qid if seen[qid] == 1 else f"{qid}#{seen[qid]}"
        items.append(_textvqa_item(q, images / str(row.get("image")), row["text"], item_id))
    return items


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(read_text(path, remedy=_OCR_REMEDY).splitlines(), 1):
        if line.strip():
            row = parse_json(line, file=f"{path}:{n}", remedy=_OCR_REMEDY)
            if not isinstance(row, dict):
                raise ForgetlessError(f"line {n}: not a JSON object", file=path, remedy=_OCR_REMEDY)
            rows.append(row)
    return rows


def score_textvqa(items: list[Item], predictions: list[str]) -> Scored:
    """``TextVQAAccuracyEvaluator.eval_pred_list``; official: what ``eval_textvqa.py`` prints (samples, accuracy
    in %)."""
    values = [textvqa_accuracy(p, it.meta["answers"]) for it, p in zip(items, predictions)]
    return Scored(values, [v >= 1 for v in values], {"samples": len(values), "accuracy": _percent(values)})


# ----------------------------------------------------------------------------------------------------------------
# GQA

_GQA_REMEDY = "pass the folder holding testdev_balanced_questions.json and images/ as GQA publishes them"
_NOT_A_STEP = ("exist", "query: name", "choose name")


def _steps(question: Mapping[str, Any]) -> int:
    """eval.py's getStepsNum: the program's operations, less the final querying ones."""
    ops = [f"{c['operation']}: {c['argument']}" for c in question.get("semantic") or ()]
    return sum(not any(o in op for o in _NOT_A_STEP) for op in ops)


def read_gqa(folder: Path) -> list[Item]:
    """GQA test-dev balanced in its file's order (the balanced questions only, as eval.py scores); with
    ``testdev_balanced_choices.json`` beside it, each question's valid and plausible answers too."""
    path = need_file(folder, "testdev_balanced_questions.json")
    questions = read_json(path, remedy=_GQA_REMEDY, limit=BIG, expect=dict)
    images = _image_dir(folder, "images")
    with _records(path, _GQA_REMEDY):
        balanced = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
    choices = _gqa_choices(folder, list(balanced))
    with _records(path, _GQA_REMEDY):
        return [_gqa_item(qid, q, images, choices) for qid, q in balanced.items()]


def _gqa_choices(folder: Path, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per question, its valid and plausible answers from ``testdev_balanced_choices.json`` (none without it)."""
    path = folder / "testdev_balanced_choices.json"
    if not path.is_file():
        return {}
    given = read_json(path, remedy=_GQA_REMEDY, limit=BIG, expect=dict)
    with _records(path, _GQA_REMEDY):
        return {qid: {"valid": given[qid]["valid"], "plausible": given[qid]["plausible"]} for qid in ids}


def _gqa_item(qid: str, q: Mapping[str, Any], images: Path, choices: Mapping[str, Any]) -> Item:
    """One question, with what eval.py reports it under: its types, reasoning steps, words and global group."""
    meta = {
        "answer": q["answer"],
        **{k: q["types"][k] for k in ("structural", "semantic", "detailed")},
        "steps": _steps(q),
        "words": len(q["question"].split()),
        "group": (q.get("groups") or {}).get("global"),
        **choices.get(qid, {}),
    }
    return Item(
        id=qid,
        image=images / f"{q['imageId']}.jpg",
        turns=[("user", q["question"] + "\n" + SHORT_ANSWER), ("assistant", q["answer"])],
        unit=qid,
        meta=meta,
    )


def gqa_prediction(text: str) -> str:
    """The answer as ``convert_gqa_for_eval.py`` writes it: trailing periods off, lower case."""
    return text.rstrip(".").lower()


def _belongs(answer: str, group: Sequence[str], meta: Mapping[str, Any]) -> bool:
    """eval.py's belongs: "common" questions take any of color, material, shape."""
    return answer in (["color", "material", "shape"] if "Common" in meta["detailed"] else group)


def _chi_square(items: Sequence[Item], answers: Sequence[str]) -> float | None:
    """eval.py's distribution score: per global group, Σ (predicted − gold count)² / gold count over the gold
    answers, averaged weighted by the group's size, /100 (``None`` where no question has a global group)."""
    gold: dict[str, Counter[str]] = defaultdict(Counter)
    said: dict[str, Counter[str]] = defaultdict(Counter)
    for it, a in zip(items, answers):
        if it.meta["group"] is not None:
            gold[it.meta["group"]][it.meta["answer"]] += 1
            said[it.meta["group"]][a] += 1
    total = sum(sum(g.values()) for g in gold.values())
    if total == 0:
        return None
    weighted = sum(
        sum((said[k][a] - e) ** 2 / e for a, e in g.items()) * sum(g.values()) for k, g in gold.items()
    )
    return weighted / total / 100


def _by(items: Sequence[Item], values: Sequence[float], key: str) -> dict[str, list[float]]:
    """Per value of ``meta[key]`` (sorted as eval.py prints them), [accuracy in %, questions]."""
    groups: dict[Any, list[float]] = defaultdict(list)
    for it, v in zip(items, values):
        groups[it.meta[key]].append(v)
    return {str(k): [_percent(groups[k]), len(groups[k])] for k in sorted(groups)}


def score_gqa(items: list[Item], predictions: list[str]) -> Scored:
    """GQA's eval.py (as LLaVA runs it: no consistency, no grounding); official: its printed figures (in %),
    validity and plausibility only where the choices file was given."""
    answers = [gqa_prediction(p) for p in predictions]
    values = [float(a == it.meta["answer"]) for it, a in zip(items, answers)]
    binary = [v for it, v in zip(items, values) if it.meta["structural"] != "query"]
    opened = [v for it, v in zip(items, values) if it.meta["structural"] == "query"]
    official: dict[str, Any] = {
        "binary": _percent(binary) if binary else 0.0,
        "open": _percent(opened) if opened else 0.0,
        "accuracy": _percent(values),
        "distribution": _chi_square(items, answers),
    }
    if all("valid" in it.meta for it in items):
        for kind in ("valid", "plausible"):
            hits = [float(_belongs(a, it.meta[kind], it.meta)) for it, a in zip(items, answers)]
            official["validity" if kind == "valid" else "plausibility"] = _percent(hits)
    official |= {
        "accuracyPerStructuralType": _by(items, values, "structural"),
        "accuracyPerSemanticType": _by(items, values, "semantic"),
        "accuracyPerSteps": _by(items, values, "steps"),
        "accuracyPerLength": _by(items, values, "words"),
    }
    return Scored(values, [v == 1 for v in values], official)


# ----------------------------------------------------------------------------------------------------------------

register(
    Benchmark(
        "vqav2",
        "VQAv2 (a split with annotations, e.g. val2014): VQA accuracy, LLaVA's answer processing",
        read_vqav2,
        score_vqav2,
        "VQA accuracy (%)",
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
register(
    Benchmark(
        "textvqa",
        "TextVQA val, the plain question (lmms-eval's prompt): VQA accuracy as TextVQAAccuracyEvaluator",
        read_textvqa,
        score_textvqa,
        "accuracy (%)",
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
register(
    Benchmark(
        "textvqa_ocr",
        "TextVQA val with LLaVA-1.5's OCR-token prompts (llava_textvqa_val_v051_ocr.jsonl)",
        read_textvqa_ocr,
        score_textvqa,
        "accuracy (%)",
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
register(
    Benchmark(
        "gqa",
        "GQA test-dev balanced: exact-match accuracy, per structural and semantic type",
        read_gqa,
        score_gqa,
        "accuracy (%)",
        max_new_tokens=MAX_NEW_TOKENS,
    )
)
