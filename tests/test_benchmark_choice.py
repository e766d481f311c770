"""MMBench, SEED-Bench and ScienceQA-IMG (forgetless.eval.benchmarks.choice): each read from small files in the
layout its maintainers publish, the prompts LLaVA-1.5's evaluation scripts build, the answer parsing and the
metrics worked out by hand from the official scorers' rules, and one run through ``run_eval`` on a tiny LLaVA."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from forgetless.errors import ForgetlessError
from forgetless.eval import benchmarks as B
from forgetless.eval.benchmarks.choice import (
    infer_choice,
    read_mmbench,
    read_scienceqa,
    read_seed,
    score_mmbench,
    score_scienceqa,
    score_seed,
    sqa_letter,
)
from forgetless.eval.report import run_eval

ASK = "Answer with the option's letter from the given choices directly."


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Decoded images go to a cache of the test's own."""
    monkeypatch.setenv(B.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------------------
# MMBench: the TSV (index, question, hint, A-D, answer, category, image, source, l2-category, comment, split)

HINT = "The passage below describes an experiment.\n\nMadelyn waxed her snowboard.\nFigure: snowboarding down a hill."
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
COLUMNS += ["l2-category", "comment", "split"]
MMB_QUESTIONS = [  # (index, question, hint, options, answer, category, l2-category, image)
    (0, "Which question can the experiment best answer?", HINT, ["thin or thick wax", "wax or none", "speed"], "B",
     "identity_reasoning", "attribute_reasoning", png((200, 30, 30))),
    (1, "How many circles are there?", "", ["one", "two"], "A", "object_localization", "coarse_perception",
     png((30, 30, 200))),
]  # fmt: skip


def copies(index, options, answer):
    """The circular copies of a question as the published TSVs hold them: index + k·1e6, options shifted."""
    n, a = len(options), "ABCD".index(answer)
    return [(index + k * 1_000_000, options[k:] + options[:k], "ABCD"[(a - k) % n]) for k in range(n)]


def write_mmbench(folder: Path, *, circular=True, legacy=False, name="MMBench_DEV_EN.tsv", drop=()) -> Path:
    """An MMBench TSV: with its circular copies (VLMEvalKit's: a copy's image is the index of the row holding it;
    legacy: every row its own base64 image) or without them."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    out = csv.writer(buf, delimiter="\t", lineterminator="\n")
    out.writerow([c for c in COLUMNS if c not in drop])
    for index, question, hint, options, answer, category, l2, image in MMB_QUESTIONS:
        rounds = copies(index, options, answer) if circular else [(index, options, answer)]
        for i, opts, ans in rounds:
            own = legacy or i == index
            row = {
                "index": i, "question": question, "hint": hint, "answer": ans, "category": category,
                "image": base64.b64encode(image).decode() if own else str(index), "source": "scienceqa",
                "l2-category": l2, "comment": "", "split": "dev",
                **dict(zip("ABCD", opts + [""] * (4 - len(opts)))),
            }  # fmt: skip
            out.writerow([row[c] for c in COLUMNS if c not in drop])
    (folder / name).write_text(buf.getvalue(), encoding="utf-8")
    return folder


MADELYN = f"{HINT}\nWhich question can the experiment best answer?\nA. thin or thick wax\nB. wax or none\nC. speed\n{ASK}"


def test_mmbench_reads_the_circular_tsv_with_llava_prompts(tmp_path, cache):
    folder = write_mmbench(tmp_path / "mmb")
    before = files_in(folder)
    items = read_mmbench(folder)
    assert [it.id for it in items] == ["0", "1000000", "2000000", "1", "1000001"]
    assert [it.unit for it in items] == ["0", "0", "0", "1", "1"]
    assert items[0].turns == [("user", MADELYN), ("assistant", "B")]
    assert items[1].turns[0][1] == (  # the copy as the file holds it: options shifted, the answer follows
        f"{HINT}\nWhich question can the experiment best answer?\nA. wax or none\nB. speed\nC. thin or thick wax\n{ASK}"
    )
    assert items[1].turns[1] == ("assistant", "A") and items[2].turns[1] == ("assistant", "C")
    assert items[3].turns == [
        ("user", f"How many circles are there?\nA. one\nB. two\n{ASK}"),
        ("assistant", "A"),
    ]
    assert items[3].meta["choices"] == {"A": "one", "B": "two"}
    assert (
        items[0].image.read_bytes() == MMB_QUESTIONS[0][7]
        and items[3].image.read_bytes() == MMB_QUESTIONS[1][7]
    )
    assert items[4].image == items[3].image and items[0].image.is_relative_to(cache / "mmbench")
    assert files_in(folder) == before  # nothing written into the benchmark folder
    legacy = read_mmbench(write_mmbench(tmp_path / "legacy", legacy=True))
    same = [
        (it.turns, it.image.name, it.unit) for it in items
    ]  # the same images, cached beside that TSV's sha
    assert [(it.turns, it.image.name, it.unit) for it in legacy] == same


def test_mmbench_without_copies_rotates_the_options_as_llava_all_rounds(tmp_path):
    items = read_mmbench(write_mmbench(tmp_path / "mmb", circular=False))
    assert [it.id for it in items] == ["0", "1000000", "2000000", "1", "1000001"]
    want = read_mmbench(write_mmbench(tmp_path / "circular"))  # the same rounds the published file holds
    assert [(it.turns, it.unit) for it in items] == [(it.turns, it.unit) for it in want]
    assert all(it.meta["rotated"] for it in items) and not any(it.meta["rotated"] for it in want)


def test_mmbench_refusals_name_the_file(tmp_path):
    with pytest.raises(ForgetlessError, match="no MMBench TSV"):
        read_mmbench(tmp_path)
    test_split = write_mmbench(tmp_path / "test", drop=("answer",))
    with pytest.raises(ForgetlessError, match="withheld") as e:
        read_mmbench(test_split)
    assert "MMBench_DEV_EN.tsv" in str(e.value)
    two = write_mmbench(write_mmbench(tmp_path / "two"), name="MMBench_DEV_EN_V11.tsv")
    with pytest.raises(ForgetlessError, match="several"):
        read_mmbench(two)
    cn = write_mmbench(tmp_path / "cn", name="mmbench_dev_cn_20231003.tsv")
    with pytest.raises(ForgetlessError, match="no MMBench TSV"):
        read_mmbench(cn)  # the English benchmark ignores the Chinese file; mmbench_cn reads it
    assert B.get("mmbench_cn").read(cn)[0].turns[0][1].endswith("\n请直接回答选项字母。")


def test_can_infer_worked_examples():
    """VLMEvalKit's can_infer (exact matching), traced by hand on its rules."""
    choices = {"A": "red", "B": "green", "C": "blue"}
    cases = {
        "B": "B",  # the letter
        "(C)": "C",  # punctuation read as spaces
        "The correct answer is **B**.": "B",  # one letter among the last words
        "B is my answer, since the square in the picture looks clearly green to me": None,  # too early, too long
        "The answer is A, not B": "A",  # two letters: "answer is X"
        "A or B": None,  # two letters, nothing else
        "It is green.": "B",  # no letter: the one option text it contains
        "green or blue": None,
        "Cannot determine the answer": "Z",  # a refusal
        "Z": "Z",
        "": None,
    }
    assert {a: infer_choice(a, choices) for a in cases} == cases


def test_mmbench_circular_eval_by_hand(tmp_path):
    items = read_mmbench(write_mmbench(tmp_path / "mmb"))
    # question 0 (answers B, A, C): every round read and right; question 1 (answers A, B): its copy answered "A"
    s = score_mmbench(items, ["B", "(A) wax or none", "The answer is C.", "A", "A"])
    assert s.correct == [True, True, True, True, False]
    assert s.values == [1.0, 0.0]
    assert s.official["Overall"] == 50.0
    assert s.official["l2-category"] == {"AR": 100.0, "CP": 0.0}
    assert s.official["category"] == {"identity_reasoning": 100.0, "object_localization": 0.0}
    assert s.official["split"] == {"dev": 100 * 1 / 2} and s.official["unread"] == 0
    s = score_mmbench(items, ["B", "A", "I am not sure", "A", "B"])  # an answer not read: the group fails
    assert s.values == [0.0, 1.0] and s.official["unread"] == 1


# ----------------------------------------------------------------------------------------------------------------
# SEED-Bench v1: SEED-Bench.json + SEED-Bench-image/<data_id>

SEED_QUESTIONS = [  # the first answers of SEED-Bench's evaluate_result/SEED-Bench-1/GPT-4V.json (id, answer, GPT-4V)
    ("101669", "A", "A"),
    ("104933", "C", "C"),
    ("89257", "C", "A"),
    ("75209", "A", "B"),
    ("34143", "D", "C"),
    ("39514", "B", "B"),
    ("8278", "D", "D"),
    ("17213", "B", "D"),
]


def write_seed(folder: Path) -> Path:
    (folder / "SEED-Bench-image").mkdir(parents=True)
    questions = []
    for n, (qid, answer, _) in enumerate(SEED_QUESTIONS):
        data_id = f"1454426_{n}"
        (folder / "SEED-Bench-image" / data_id).write_bytes(png((n * 20, 50, 50)))
        questions.append({
            "answer": answer, "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
            "data_id": data_id, "data_type": "image", "question": "How many towels are in the image?",
            "question_id": qid, "question_type_id": 5 if n < 5 else 1, "segment": None,
        })  # fmt: skip
    video = {**questions[0], "data_type": "video", "question_id": "9", "question_type_id": 11}
    types = {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 11}
    (folder / "SEED-Bench.json").write_text(
        json.dumps({"question_type": types, "questions": [*questions, video]})
    )
    return folder


def test_seed_reads_image_questions_with_llava_prompt(tmp_path):
    folder = write_seed(tmp_path / "seed")
    items = read_seed(folder)
    assert [it.id for it in items] == [q for q, _, _ in SEED_QUESTIONS]  # the video question skipped
    # llava-seed-bench.jsonl's record of question 101669
    prompt = f"How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n{ASK}"
    assert items[0].turns == [("user", prompt), ("assistant", "A")]
    assert items[0].image == (folder / "SEED-Bench-image" / "1454426_0").resolve()
    shutil.rmtree(folder / "SEED-Bench-image")
    with pytest.raises(ForgetlessError, match="no SEED-Bench-image folder"):
        read_seed(folder)


def test_seed_accuracy_is_exact_letter_match(tmp_path):
    items = read_seed(write_seed(tmp_path / "seed"))
    gpt4v = [p for _, _, p in SEED_QUESTIONS]
    s = score_seed(items, gpt4v)
    assert s.correct == [True, True, False, False, False, True, True, False]
    assert s.official["image accuracy"] == 50.0  # 4 of 8
    assert s.official["question_type"] == {"Instances Counting": 40.0, "Scene Understanding": 200 / 3}
    assert s.official["video_questions_skipped"] == 1
    assert score_seed(items, ["A.", "c", " C", "A", "D", "B", "D", "B"]).correct == [False] * 3 + [True] * 5


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA: problems.json + pid_splits.json + images/test/<pid>/image.png

SQA = {  # pid: (split, image, hint, question, choices, answer, subject, topic, grade)
    "1": ("train", True, "", "Which of these states is farthest north?", ["West Virginia", "Louisiana"], 0,
          "social science", "geography", "grade2"),
    "6": ("test", True, "Look at the shapes.", "Which object is blue?", ["the circle", "the square"], 1,
          "natural science", "physics", "grade7"),
    "7": ("test", False, "A story.", "Which word is a verb?", ["run", "red"], 0, "language science", "verbs",
          "grade3"),
    "8": ("test", True, "", "Which word would you find on a dictionary page?", ["tall", "sheep", "zoo"], 2,
          "language science", "vocabulary", "grade4"),
    "9": ("test", True, "Cells.", "Which is a plant?", ["fern", "cat"], 0, "natural science", "biology",
          "grade10"),
}  # fmt: skip


def write_sqa(folder: Path) -> Path:
    problems, splits = {}, {"train": [], "val": [], "test": []}
    for pid, (split, image, hint, question, choices, answer, subject, topic, grade) in SQA.items():
        problems[pid] = {
            "question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if image else None, "task": "closed choice", "grade": grade, "subject": subject,
            "topic": topic, "category": "c", "skill": "s", "lecture": "", "solution": "", "split": split,
        }  # fmt: skip
        splits[split].append(pid)
        if image:
            (folder / "images" / split / pid).mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 200, 10)).save(folder / "images" / split / pid / "image.png")
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps(splits))
    return folder


def test_scienceqa_reads_test_problems_with_an_image(tmp_path):
    folder = write_sqa(tmp_path / "sqa")
    items = read_scienceqa(folder)
    assert [it.id for it in items] == ["6", "8", "9"]
    assert items[0].turns == [  # llava_test_CQM-A.json's question with --single-pred-prompt
        ("user", f"Context: Look at the shapes.\nWhich object is blue?\nA. the circle\nB. the square\n{ASK}"),
        ("assistant", "B"),
    ]
    assert (
        items[1].turns[0][1]
        == f"Which word would you find on a dictionary page?\nA. tall\nB. sheep\nC. zoo\n{ASK}"
    )
    assert items[1].image == (folder / "images" / "test" / "8" / "image.png").resolve()
    splits = json.loads((folder / "pid_splits.json").read_text())
    (folder / "pid_splits.json").write_text(json.dumps({**splits, "test": ["6", "404"]}))
    with pytest.raises(ForgetlessError, match="no problem 404") as e:
        read_scienceqa(folder)
    assert "problems.json" in str(e.value)


def test_scienceqa_parse_and_accuracies_by_hand(tmp_path):
    parsed = {"A": "A", "B. the square": "B", "B.": "FAILED", "The answer is C.": "C", "(A)": "FAILED"}
    parsed |= {"The answer is A. The answer is B.": "FAILED", "E": "E", "I think B": "FAILED"}
    assert {t: sqa_letter(t) for t in parsed} == parsed
    items = read_scienceqa(write_sqa(tmp_path / "sqa"))
    s = score_scienceqa(items, ["B", "C. zoo", "E"])  # right, right, E is not among problem 9's two choices
    assert s.correct == [True, True, False] and s.values == [1.0, 1.0, 0.0]
    o = s.official
    assert o["acc_average"] == pytest.approx(200 / 3) and o["acc_has_image"] == pytest.approx(200 / 3)
    assert (o["acc_natural"], o["acc_social"], o["acc_language"]) == (50.0, None, 100.0)
    assert (o["acc_has_text"], o["acc_no_context"]) == (50.0, None)  # problems 6 and 9 have a hint
    assert (o["acc_grade_1_6"], o["acc_grade_7_12"]) == (100.0, 50.0)
    assert (o["acc_physics"], o["acc_vocabulary"], o["acc_biology"]) == (100.0, 100.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# end to end


def test_three_benchmarks_through_eval_rescored_and_against_themselves(tmp_path, llava_eval_dir):
    folders = {
        "mmbench": write_mmbench(tmp_path / "mmb"),
        "seedbench": write_seed(tmp_path / "seed"),
        "scienceqa_img": write_sqa(tmp_path / "sqa"),
    }
    run = {"device": "cpu", "progress": False, "log": None, "max_new_tokens": 3}
    res = run_eval(llava_eval_dir, None, None, benchmarks=list(folders.items()), **run)
    readers = {"mmbench": read_mmbench, "seedbench": read_seed, "scienceqa_img": read_scienceqa}
    scorers = {"mmbench": score_mmbench, "seedbench": score_seed, "scienceqa_img": score_scienceqa}
    for name, folder in folders.items():
        entry, official = res["tasks"][name], res["benchmarks"][name]
        assert official["value"] == pytest.approx(100 * entry["accuracy"], rel=1e-12)
        texts = [p["prediction"] for p in entry["predictions"]]
        again = scorers[name](readers[name](folder), texts)
        assert entry["correct_items"] == "".join("1" if v else "0" for v in again.values)
        assert [p["correct"] for p in entry["predictions"]] == again.correct
        headline = {"mmbench": "Overall", "seedbench": "image accuracy", "scienceqa_img": "acc_average"}[name]
        assert official[headline] == pytest.approx(official["value"], rel=1e-12)
    assert (res["tasks"]["mmbench"]["n"], res["tasks"]["mmbench"]["n_questions"]) == (2, 5)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**res, "path": str(base)}))
    again = run_eval(llava_eval_dir, None, None, benchmarks=list(folders.items()), base=base, **run)
    for name in folders:
        assert again["benchmarks"][name]["vs_base"] == {"value": 0.0, "interval": [0.0, 0.0]}


def test_known_answers_give_the_hand_worked_headlines(tmp_path, llava_eval_dir, monkeypatch):
    """Generation replaced by the reference letter (the last question of each benchmark answered "no idea"): the
    headlines, their per-unit values and the paired change against the tiny model's own answers are known."""
    from forgetless.eval import harness

    folders = [("mmbench", write_mmbench(tmp_path / "mmb")), ("seedbench", write_seed(tmp_path / "seed"))]
    folders.append(("scienceqa_img", write_sqa(tmp_path / "sqa")))
    run = {"device": "cpu", "progress": False, "log": None}
    base = tmp_path / "base.json"
    run_eval(llava_eval_dir, None, None, benchmarks=folders, out=base, max_new_tokens=3, **run)
    last = {"1000001", SEED_QUESTIONS[-1][0], "9"}

    def known(model, encoder, samples, max_new_tokens, batch_size):
        return ["no idea" if s.id in last else s.turns[-1][1] for s in samples]

    monkeypatch.setattr(harness, "generate_answers", known)
    res = run_eval(llava_eval_dir, None, None, benchmarks=folders, base=base, **run)
    want = {"mmbench": (50.0, "10"), "seedbench": (87.5, "11111110"), "scienceqa_img": (200 / 3, "110")}
    for name, (value, items) in want.items():
        assert res["tasks"][name]["correct_items"] == items
        assert res["benchmarks"][name]["value"] == pytest.approx(value, rel=1e-12)
        before = json.loads(base.read_text())["benchmarks"][name]["value"]
        assert res["benchmarks"][name]["vs_base"]["value"] == pytest.approx(value - before, rel=1e-12)
