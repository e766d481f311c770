"""Letter-choice benchmarks: MMBench (CircularEval), SEED-Bench (v1, image questions) and ScienceQA-IMG.

Each question is asked as the LLaVA-1.5 evaluation scripts ask it: the question, its options as ``A. …`` lines and
"Answer with the option's letter from the given choices directly."; the generated text is turned into a letter by
the benchmark's own rule (VLMEvalKit's ``can_infer`` for MMBench, exact match for SEED-Bench, LLaVA's
``eval_science_qa.py`` for ScienceQA). No judge model is asked: an answer the rule cannot read counts as wrong.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ...errors import ForgetlessError
from ...safeload import read_json
from . import Benchmark, Item, Scored, by_unit, cache_dir, decoded_image, need_file, register, units_in_order

SUFFIX = "Answer with the option's letter from the given choices directly."
SUFFIX_CN = "请直接回答选项字母。"  # model_vqa_mmbench.py --lang cn


def _prompt(stem: str, options: Sequence[str]) -> str:
    """``stem`` then one ``A. option`` line per option (without the answer suffix)."""
    lines = (f"{letter}. {opt}" for letter, opt in zip(string.ascii_uppercase, options))
    return "\n".join([stem, *lines])


def _item(
    source: Path,
    index: int,
    id: str,
    image: Path,
    prompt: str,
    answer: str,
    unit: str | None = None,
    **meta: Any,
) -> Item:
    """One question (its own unit unless ``unit`` is given): the prompt as the user turn (the image goes first),
    the answer letter as the assistant's."""
    return Item(
        id=id,
        image=image.resolve(),
        turns=[("user", prompt), ("assistant", answer)],
        source=source,
        index=index,
        unit=id if unit is None else unit,
        meta={"answer": answer, **meta},
    )


def _percent(flags: Sequence[bool]) -> float | None:
    """The share of true flags in %, ``None`` for none."""
    return 100.0 * sum(flags) / len(flags) if flags else None


def _rates(keys: Iterable[Any], flags: Sequence[bool]) -> dict[str, float | None]:
    """Per distinct key (sorted), the accuracy in % of its flags."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, f in zip(keys, flags):
        groups[str(k)].append(f)
    return {k: _percent(groups[k]) for k in sorted(groups)}


LAYOUT = "use the file as its maintainers publish it (see docs/benchmarks.md)"


def _bad(path: Path, problem: str) -> ForgetlessError:
    return ForgetlessError(problem, file=path, remedy=LAYOUT)


# ----------------------------------------------------------------------------------------------------------------
# MMBench

COPY_STRIDE = (
    1_000_000  # a circular copy of question i has index i + k·1e6 (VLMEvalKit's g_index = index % 1e6)
)
OPTION_COLUMNS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options
MMB_COLUMNS = ("index", "question", "A", "B", "answer", "image")
PANDAS_NA = frozenset(  # pandas.read_table's default NA strings: the scripts read the TSV with pandas
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
L2_ABBREVIATIONS = {  # VLMEvalKit's MMB_abbrs
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
_REFUSALS = (  # VLMEvalKit's can_infer_option: answers read as the refusal option Z
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _is_cn(path: Path) -> bool:
    return re.search(r"(^|_)cn(_|\.|$)", path.name.casefold()) is not None


def _mmbench_tsv(folder: Path, cn: bool) -> Path:
    """The folder's MMBench TSV of the language asked for (a dev split preferred where there are several)."""
    found = sorted(p for p in folder.glob("*.tsv") if "mmbench" in p.name.casefold() and _is_cn(p) == cn)
    if len(found) > 1:
        found = [p for p in found if "dev" in p.name.casefold()] or found
    if len(found) == 1:
        return found[0]
    what = "Chinese " if cn else ""
    if not found:
        raise ForgetlessError(
            f"no {what}MMBench TSV (e.g. MMBench_DEV_EN.tsv, mmbench_dev_20230712.tsv) in the benchmark folder",
            file=folder,
            remedy="pass --benchmark-dir the folder holding the TSV the MMBench maintainers publish",
        )
    raise ForgetlessError(
        f"several {what}MMBench TSVs in the benchmark folder: {', '.join(p.name for p in found)}",
        file=folder,
        remedy="keep the one split to evaluate in the folder",
    )


def _tsv_rows(path: Path, data: bytes) -> list[dict[str, str | None]]:
    """The TSV's rows as pandas.read_table reads them: quoted fields, blank lines skipped, pandas' NA strings as
    ``None``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _bad(path, f"not UTF-8 text ({e})") from None
    old = csv.field_size_limit(2**31 - 1)  # a base64 image is one field
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter="\t") if r]
    except csv.Error as e:
        raise _bad(path, f"not a tab-separated table ({e})") from None
    finally:
        csv.field_size_limit(old)
    if not rows:
        raise _bad(path, "the TSV is empty")
    header = rows[0]
    missing = [c for c in MMB_COLUMNS if c not in header]
    if missing:
        test = " (the test split's answers are withheld: use the dev split)" if missing == ["answer"] else ""
        raise _bad(path, f"no {', '.join(missing)} column{test}")
    for n, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise _bad(path, f"row {n} has {len(r)} fields, the header {len(header)}")
    return [{k: (None if v in PANDAS_NA else v) for k, v in zip(header, r)} for r in rows[1:]]


def _is_none(value: str | None) -> bool:
    """model_vqa_mmbench.py's is_none (NaN, 'nan', 'none')."""
    return value is None or value.lower() in ("nan", "none")


def _indexed(path: Path, rows: list[dict[str, str | None]]) -> dict[int, dict[str, str | None]]:
    """The rows by their integer ``index`` (unique), each with its options (up to the first missing one)."""
    out: dict[int, dict[str, str | None]] = {}
    for row in rows:
        try:
            i = int(row["index"] or "")
        except ValueError:
            raise _bad(path, f"index {row['index']!r} is not an integer") from None
        if i in out:
            raise _bad(path, f"index {i} appears twice")
        options = []
        for c in OPTION_COLUMNS:
            if c not in row or _is_none(row[c]):
                break
            options.append(row[c])
        if row["answer"] not in OPTION_COLUMNS[: len(options)] or len(options) < 2:
            raise _bad(path, f"index {i}: the answer {row['answer']!r} is not one of its options")
        out[i] = {**row, "options": options}  # type: ignore[dict-item]
    return out


def _rotated(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """A TSV without circular copies: each question once per option, its options rotated as
    model_vqa_mmbench.py --all-rounds does, the copies indexed i + k·1e6 as in the published files."""
    out: dict[int, dict[str, Any]] = {}
    for i, row in rows.items():
        options, n = row["options"], len(row["options"])
        answer = OPTION_COLUMNS.index(row["answer"])
        for k in range(n):
            copy = {**row, "options": options[k:] + options[:k], "answer": OPTION_COLUMNS[(answer - k) % n]}
            out[i + k * COPY_STRIDE] = {**copy, "rotated": True}
    return out


def _image_bytes(path: Path, rows: Mapping[int, Mapping[str, Any]], i: int) -> bytes:
    """Row ``i``'s image: its base64 field, or (VLMEvalKit's TSVs, up to 64 characters) the index of the row
    holding it."""
    value = rows[i]["image"] or ""
    if 0 < len(value) <= 64:
        try:
            value = rows[int(value)]["image"] or ""
        except (ValueError, KeyError):
            raise _bad(
                path, f"index {i}: its image refers to index {value!r}, which is not in the file"
            ) from None
    try:
        data = base64.b64decode(value)
    except (binascii.Error, ValueError):
        raise _bad(path, f"index {i}: the image is not base64") from None
    if not data:
        raise _bad(path, f"index {i}: no image")
    return data


def _suffix(data: bytes) -> str:
    return ".jpg" if data.startswith(b"\xff\xd8") else ".png"


def read_mmbench(folder: Path, *, cn: bool = False) -> list[Item]:
    """The MMBench TSV's questions as model_vqa_mmbench.py --single-pred-prompt asks them (hint, question,
    ``A. …`` lines, the letter instruction), one unit per circular group (index % 1e6). A TSV without circular
    copies (no index ≥ 1e6) gets them by rotating the options."""
    path = _mmbench_tsv(folder, cn)
    data = path.read_bytes()
    rows = _indexed(path, _tsv_rows(path, data))
    if all(i < COPY_STRIDE for i in rows):
        rows = _rotated(rows)
    orphans = sorted(i for i in rows if i % COPY_STRIDE not in rows)
    if orphans:
        raise _bad(
            path,
            f"index {orphans[0]} is a circular copy of index {orphans[0] % COPY_STRIDE}, not in the file",
        )
    images = cache_dir("mmbench", hashlib.sha256(data).hexdigest()[:16])
    decoded: dict[str, Path] = {}
    suffix = SUFFIX_CN if cn else SUFFIX
    items = []
    for n, (i, row) in enumerate(rows.items()):
        key = row["image"] or ""
        if key not in decoded:
            raw = _image_bytes(path, rows, i)
            decoded[key] = decoded_image(raw, images, _suffix(raw))
        stem = row["question"] or ""
        if not _is_none(row.get("hint")):
            stem = f"{row['hint']}\n{stem}"
        choices = dict(zip(OPTION_COLUMNS, row["options"]))
        items.append(
            _item(
                path,
                n,
                str(i),
                decoded[key],
                f"{_prompt(stem, row['options'])}\n{suffix}",
                row["answer"],
                unit=str(i % COPY_STRIDE),
                choices=choices,
                category=row.get("category"),
                l2=row.get("l2-category"),
                split=row.get("split"),
                rotated=row.get("rotated", False),
            )
        )
    return items


def infer_choice(answer: str, choices: Mapping[str, str]) -> str | None:
    """The letter VLMEvalKit's ``can_infer`` reads from ``answer`` (``Z``: a refusal), ``None`` where it reads
    none (it would then ask its judge model, which forgetless does not)."""
    return _infer_option(answer, choices) or _infer_text(answer, choices)


def _infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_option: one option letter among the answer's last words (punctuation as
    spaces), else "answer is X"."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [c for c in choices if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    found = _VERBOSE_ANSWER.search(answer)
    return found.group(1).upper() if found and found.group(1).upper() in choices else None


def _infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_text: the one option whose text the (short enough) answer contains."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def score_mmbench(items: list[Item], predictions: list[str]) -> Scored:
    """CircularEval (VLMEvalKit's mcq_circular_eval, exact matching): a group counts only if every copy's
    letter is read and right; per category and l2-category as report_acc reports them, in %."""
    picks = [infer_choice(p, it.meta["choices"]) for it, p in zip(items, predictions)]
    correct = [pick == it.meta["answer"] for it, pick in zip(items, picks)]
    values = [float(all(v)) for v in by_unit(items, correct).values()]
    mains = {
        it.unit: it for it in items if it.id == it.unit
    }  # the question itself (index < 1e6) of each group
    first = [mains[u] for u in units_in_order(items)]
    hits = [v == 1.0 for v in values]
    official = {
        "Overall": _percent(hits),
        "split": _rates((it.meta["split"] for it in first), hits),
        "l2-category": _rates((L2_ABBREVIATIONS.get(it.meta["l2"], it.meta["l2"]) for it in first), hits),
        "category": _rates((it.meta["category"] for it in first), hits),
        "questions": len(items),
        "unread": sum(p is None for p in picks),
        "rotated_by_forgetless": any(it.meta["rotated"] for it in items),
    }
    return Scored(values, correct, official)


# ----------------------------------------------------------------------------------------------------------------
# SEED-Bench

SEED_IMAGES = "SEED-Bench-image"


def read_seed(folder: Path) -> list[Item]:
    """SEED-Bench.json's image questions (data_type ``image``; its video questions are skipped), asked as
    LLaVA's llava-seed-bench.jsonl asks them; each its own unit."""
    path = need_file(folder, "SEED-Bench.json")
    data = read_json(path, remedy=LAYOUT, expect=dict)
    if not isinstance(data.get("questions"), list):
        raise _bad(path, "no 'questions' list")
    types = data.get("question_type")
    names = {v: k for k, v in types.items()} if isinstance(types, dict) else {}
    questions = [q for q in data["questions"] if isinstance(q, dict)]
    images = [q for q in questions if q.get("data_type") == "image"]
    skipped = len(questions) - len(images)
    if images and not (folder / SEED_IMAGES).is_dir():
        raise ForgetlessError(
            f"no {SEED_IMAGES} folder beside SEED-Bench.json",
            file=folder,
            remedy="unpack SEED-Bench-image.zip there",
        )
    return [_seed_item(path, folder, n, q, names, skipped) for n, q in enumerate(images)]


def _seed_item(path: Path, folder: Path, n: int, q: dict, names: dict, skipped: int) -> Item:
    try:
        options = [str(q[f"choice_{c}"]) for c in "abcd"]
        qid, answer, kind = str(q["question_id"]), q["answer"], q["question_type_id"]
        image = folder / SEED_IMAGES / str(q["data_id"])
        prompt = f"{_prompt(str(q['question']), options)}\n{SUFFIX}"
    except KeyError as e:
        raise _bad(path, f"question {n} has no {e.args[0]!r}") from None
    if answer not in OPTION_COLUMNS:
        raise _bad(path, f"question {qid}: the answer {answer!r} is not A-D")
    return _item(path, n, qid, image, prompt, answer, type=names.get(kind, str(kind)), videos_skipped=skipped)


def score_seed(items: list[Item], predictions: list[str]) -> Scored:
    """convert_seed_for_submission.py's rule: right when the (stripped) answer is exactly the letter; accuracy per
    question type and over the image questions, in %."""
    correct = [p == it.meta["answer"] for it, p in zip(items, predictions)]
    official = {
        "image accuracy": _percent(correct),
        "question_type": _rates((it.meta["type"] for it in items), correct),
        "questions": len(items),
        "video_questions_skipped": items[0].meta["videos_skipped"] if items else 0,
    }
    return Scored([float(c) for c in correct], correct, official)


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG

SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
GRADES = {"grade_1_6": range(1, 7), "grade_7_12": range(7, 13)}


def read_scienceqa(folder: Path) -> list[Item]:
    """The test split's problems with an image (problems.json, pid_splits.json, images/test/<pid>/image.png),
    asked as LLaVA's llava_test_CQM-A.json with --single-pred-prompt asks them; each its own unit."""
    problems_path = need_file(folder, "problems.json")
    problems = read_json(problems_path, remedy=LAYOUT, expect=dict)
    splits_path = need_file(folder, "pid_splits.json")
    test = read_json(splits_path, remedy=LAYOUT, expect=dict).get("test")
    if not isinstance(test, list):
        raise _bad(splits_path, "no 'test' list of problem ids")
    root = folder / "images" / "test" if (folder / "images" / "test").is_dir() else folder / "test"
    items = []
    for pid in map(str, test):
        if not isinstance(problems.get(pid), dict):
            raise _bad(problems_path, f"no problem {pid} (listed in pid_splits.json)")
        if problems[pid].get("image"):
            items.append(_sqa_item(problems_path, root, len(items), pid, problems[pid]))
    return items


def _sqa_item(path: Path, root: Path, n: int, pid: str, p: dict) -> Item:
    choices = p.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(SQA_OPTIONS):
        raise _bad(path, f"problem {pid}: 'choices' is not a list of 2 to 5 answers")
    if not isinstance(p.get("answer"), int) or not 0 <= p["answer"] < len(choices):
        raise _bad(path, f"problem {pid}: 'answer' is not the index of one of its choices")
    context = f"Context: {p['hint']}\n" if p.get("hint") else ""
    body = _prompt(f"{context}{p.get('question', '')}", [str(c) for c in choices]).strip()
    grade = re.sub(r"\D", "", str(p.get("grade", "")))
    return _item(
        path,
        n,
        pid,
        root / pid / str(p["image"]),
        f"{body}\n{SUFFIX}",
        SQA_OPTIONS[p["answer"]],
        n_choices=len(choices),
        subject=p.get("subject"),
        topic=p.get("topic"),
        has_text=bool(p.get("hint")),
        grade=int(grade) if grade else None,
    )


def sqa_letter(text: str) -> str:
    """eval_science_qa.py's parse: the letter itself, ``X. …``, or one "The answer is X." (else ``FAILED``)."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score_scienceqa(items: list[Item], predictions: list[str]) -> Scored:
    """eval_science_qa.py's rule (a letter outside the problem's choices, or none, is wrong) and the accuracies
    ScienceQA's tools/evaluate_acc.py reports, in % (``None`` where it reports -1: no such problem)."""
    letters = [sqa_letter(p) for p in predictions]
    correct = [
        letter in SQA_OPTIONS[: it.meta["n_choices"]] and letter == it.meta["answer"]
        for it, letter in zip(items, letters)
    ]

    def acc(keep) -> float | None:
        return _percent([c for it, c in zip(items, correct) if keep(it.meta)])

    official: dict[str, Any] = {
        "acc_natural": acc(lambda m: m["subject"] == "natural science"),
        "acc_social": acc(lambda m: m["subject"] == "social science"),
        "acc_language": acc(lambda m: m["subject"] == "language science"),
        "acc_has_text": acc(lambda m: m["has_text"]),
        "acc_has_image": acc(lambda m: True),
        "acc_no_context": acc(lambda m: False),  # every problem here has its image
        **{f"acc_{k}": acc(lambda m, r=r: m["grade"] in r) for k, r in GRADES.items()},
        "acc_average": _percent(correct),
    }
    topics = _rates((it.meta["topic"] for it in items), correct)
    official.update({f"acc_{t}": v for t, v in topics.items()})
    official["questions"] = len(items)
    return Scored([float(c) for c in correct], correct, official)


# ----------------------------------------------------------------------------------------------------------------

MAX_NEW_TOKENS = 16  # a letter; what is longer counts as the scorers would count it

BENCHMARKS = (  # name, description, reader, scorer, headline
    ("mmbench", "MMBench (English), CircularEval", read_mmbench, score_mmbench, "CircularEval accuracy (%)"),
    ("mmbench_cn", "MMBench (Chinese), CircularEval", partial(read_mmbench, cn=True), score_mmbench,
     "CircularEval accuracy (%)"),
    ("seedbench", "SEED-Bench (v1) image questions", read_seed, score_seed, "image accuracy (%)"),
    ("scienceqa_img", "ScienceQA test problems with an image", read_scienceqa, score_scienceqa,
     "IMG accuracy (%)"),
)  # fmt: skip
for _fields in BENCHMARKS:
    register(Benchmark(*_fields, max_new_tokens=MAX_NEW_TOKENS))  # in % (the default scale 100)
