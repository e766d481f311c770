"""MME and POPE (forgetless.eval.benchmarks.yesno): each read from small files in its published layout (MME's
category folders, POPE's coco/ + val2014/), the prompts of LLaVA-1.5's scripts, the answer parsing and metrics of
the official scorers (MME's eval_tool/calculation.py on lines of its own LaVIN example; eval_pope.py worked by
hand), the refusals, and whole runs through ``forgetless eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from forgetless.errors import ForgetlessError
from forgetless.eval import benchmarks as B
from forgetless.eval import harness
from forgetless.eval.benchmarks import yesno as Y
from forgetless.eval.metrics import item_correct
from forgetless.eval.report import run_eval

SUFFIX = "\nAnswer the question using a single word or phrase."
SPLIT_LAYOUT = ("posters", "celebrity", "scene", "landmark", "artwork")  # images/ + questions_answers_YN/

# Lines of the MME eval tool's own example (eval_tool/LaVIN/<category>.txt: image, question, truth, LaVIN's
# answer), and the scores its calculation.py prints for exactly these lines.
LAVIN = {
    "count": """\
000000006040.jpg	Is there a train in the picture? Please answer yes or no.	Yes	yes, there is a train in the picture. the train is a blue and white passenger train travel
000000006040.jpg	Are there a total of two trains in the picture? Please answer yes or no.	No	yes, there are a total of two trains in the picture. one train is a blue and white
000000044279.jpg	Is there a total of two people in the image? Please answer yes or no.	Yes	yes, there are a total of two people in the image. the two men are working together in
000000044279.jpg	Is there only one people in the image? Please answer yes or no.	No	no, there are two people in the image. they are both wearing white aprons and are
000000067213.jpg	Is there only one dog in the image? Please answer yes or no.	Yes	no, there are multiple dogs in the image. the main focus of the image is a dog jump
000000067213.jpg	Is there two dogs in the image? Please answer yes or no.	No	no, there is only one dog in the image. the dog is jumping into a body of
000000071226.jpg	Is there a total of two dogs in the image? Please answer yes or no.	Yes	yes, there are a total of two dogs in the image. the dogs are lying on a bed
000000071226.jpg	Is there only one dogs in the image? Please answer yes or no.	No	yes, there is only one dog in the image. the dog is lying on the bed with its
""",
    "OCR": """\
0001.jpg	Is the word in the logo "angie's"? Please answer yes or no.	Yes	yes, the word in the logo is "angie's." the logo features a red circle
0001.jpg	Is the word in the logo "angle's"? Please answer yes or no.	No	no, the word in the logo is not "angle's." the word is "angles."
0002.jpg	Is the word in the logo "c'est cheese"? Please answer yes or no.	Yes	yes, the word in the logo is "c'est cheese." the logo features a picture
0002.jpg	Is the word in the logo "crest cheese"? Please answer yes or no.	No	yes, the word in the logo is "crest cheese." the logo features a picture of
0003.jpg	Is the word in the logo "beavertails pastry"? Please answer yes or no.	Yes	yes, the word in the logo is "beavertails pastry." the logo features a
0003.jpg	Is the word in the logo "beavertalls pastry"? Please answer yes or no.	No	yes, the word in the logo is "beavertails pastry." beavertails
""",
    "commonsense_reasoning": """\
0002.png	Should I stop when I'm about to cross the street and see the sign in the picture? Please answer yes or no.	Yes	yes, you should stop when you are about to cross the street and see the red traffic light in
0002.png	When I see the sign in the picture, can I cross the street? Please answer yes or no.	No	in the image, there is a red traffic light with a "do not walk" sign. the
0005.png	The office's normal closing time is 5 p.m. Now is afternoon. Should I continue to work at the time shown in the picture? Please answer yes or no.	Yes	no, you should not continue to work at the time shown in the picture. the image shows a
0005.png	The office's normal closing time is 5 p.m. Now is afternoon. Could I leave work at the time shown in the picture? Please answer yes or no.	No	based on the image, where a person is wearing a blue watch with a blue band and
0006.png	I recently want to go on vacation to relax and go to a place full of fresh air. Is the venue in the picture appropriate? Please answer yes or no.	Yes	yes, the venue in the picture is appropriate for a relaxing vacation in a place full
0006.png	I want to go where there are a lot of people. Is the venue in the picture appropriate? Please answer yes or no.	No	no, the venue in the picture is not appropriate for going to a place with a lot of
""",
}
# calculation.py on these lines: count 87.5, OCR 99.99999999999999, commonsense_reasoning 83.33333333333333
LAVIN_SCORES = {"count": 87.5, "OCR": 100.0, "commonsense_reasoning": 250 / 3}
# every other category: one image, its second question with the two spaces some MME files have
OTHER = [
    ("q.jpg", "Is it red? Please answer yes or no.", "Yes"),
    ("q.jpg", "Is it blue?  Please answer yes or no.", "No"),
]


def _lavin(category: str) -> list[list[str]]:
    return [line.split("\t") for line in LAVIN[category].splitlines()]


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 160, 40)).save(path)


def write_mme(root: Path) -> Path:
    """An MME_Benchmark_release_version folder: the LaVIN lines' images and questions, one image elsewhere."""
    for category in Y.MME_CATEGORIES:
        rows = [r[:3] for r in _lavin(category)] if category in LAVIN else OTHER
        folder = root / category
        images, texts = (
            (folder / "images", folder / "questions_answers_YN")
            if category in SPLIT_LAYOUT
            else (folder, folder)
        )
        texts.mkdir(parents=True, exist_ok=True)
        for image in dict.fromkeys(r[0] for r in rows):
            write_image(images / image)
            lines = [f"{q}\t{a}\n" for name, q, a in rows if name == image]
            (texts / f"{Path(image).stem}.txt").write_text("".join(lines), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------------------------------------------
# MME


def test_mme_reads_both_layouts_with_llava_prompts(tmp_path):
    root = write_mme(tmp_path / "MME" / "MME_Benchmark_release_version")
    items = Y.read_mme(root)
    assert [it.meta["category"] for it in items[::2]][:2] == ["existence", "count"]
    assert items[-1].meta["category"] == "code_reasoning" and len(items) == 2 * (11 + 4 + 3 + 3)
    assert len({it.id for it in items}) == len(items) and len(B.units_in_order(items)) == len(items) // 2
    art = [it for it in items if it.meta["category"] == "artwork"]
    assert [it.id for it in art] == ["artwork/images/q.jpg#1", "artwork/images/q.jpg#2"]
    assert art[0].image == root.resolve() / "artwork" / "images" / "q.jpg"
    assert art[0].unit == "artwork/images/q.jpg"
    assert art[0].turns == [("user", "Is it red?" + SUFFIX), ("assistant", "Yes")]
    blue = "Is it blue?" + SUFFIX  # from "Is it blue?  Please answer yes or no." (two spaces)
    assert art[1].turns == [("user", blue), ("assistant", "No")]
    ocr = [it for it in items if it.meta["category"] == "OCR"]
    assert ocr[1].unit == "OCR/0001.jpg" and ocr[1].image.is_absolute() and ocr[1].image.is_file()
    assert ocr[1].turns[0][1] == 'Is the word in the logo "angle\'s"?' + SUFFIX  # as llava_mme.jsonl has it
    assert ocr[1].meta == {"category": "OCR", "label": "no"}
    assert Y.read_mme(tmp_path / "MME") == items  # the folder above the release folder (LLaVA's playground)
    assert B.get("mme").read is Y.read_mme and "mme" in B.names() and "pope" in B.names()


def test_mme_refusals_name_the_file(tmp_path):
    root = write_mme(tmp_path / "mme")
    txt = root / "count" / "000000006040.txt"
    good = txt.read_text()
    for text, problem in [
        (good + "Is it a cat? Please answer yes or no.\tNo\n", "3 questions"),
        (good.replace("\tNo", "\tMaybe"), "line 2 is not"),
        (good.replace("\t", " ", 1), "line 1 is not"),
    ]:
        txt.write_text(text)
        with pytest.raises(ForgetlessError, match=problem) as e:
            Y.read_mme(root)
        assert str(txt) in str(e.value)
    txt.write_text(good)
    (root / "count" / "000000006040.jpg").unlink()
    with pytest.raises(ForgetlessError, match="no image 000000006040.jpg") as e:
        Y.read_mme(root)
    assert str(txt) in str(e.value)
    write_image(root / "count" / "000000006040.jpg")
    for f in (root / "code_reasoning").iterdir():
        f.unlink()
    with pytest.raises(ForgetlessError, match="'code_reasoning' has no question files"):
        Y.read_mme(root)
    with pytest.raises(ForgetlessError, match="no MME category folders") as e:
        Y.read_mme(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_mme_answers_are_read_as_calculation_py_reads_them():
    cases = {
        "Yes": "yes",
        "no.": "no",
        " yes": "yes",
        "Not sure": "no",  # "no" within the first four characters
        "nope": "no",
        "I think yes": "other",
        "The answer is no": "other",
        "y\nes": "yes",  # line breaks deleted, as the tool's readme asks
        "": "other",
    }
    assert {text: Y.mme_answer(text) for text in cases} == cases


def test_mme_scores_match_the_official_tool_on_its_lavin_example(tmp_path):
    items = [it for it in Y.read_mme(write_mme(tmp_path / "mme")) if it.meta["category"] in LAVIN]
    predictions = [lavin_answer(it) for it in items]
    s = Y.score_mme(items, predictions)
    per = s.official["categories"]
    assert {c: f["score"] for c, f in per.items()} == pytest.approx(LAVIN_SCORES, rel=1e-12)
    # count by hand: right 1+2+1+1 of 8 questions, both right on 1 of 4 images → 100·(5/8 + 1/4)
    assert (per["count"]["acc"], per["count"]["acc_plus"], per["count"]["images"]) == (5 / 8, 1 / 4, 4)
    # commonsense_reasoning: two answers start neither yes nor no ("in t", "base"): "other", counted wrong
    assert (per["commonsense_reasoning"]["other"], per["commonsense_reasoning"]["acc"]) == (2, 0.5)
    assert s.official["perception"] == pytest.approx(187.5)
    assert s.official["cognition"] == pytest.approx(250 / 3)
    assert sum(s.values) / len(s.values) * Y.MME_SCALE == pytest.approx(187.5 + 250 / 3, rel=1e-12)
    assert s.correct[:4] == [True, False, True, True] and len(s.values) == 4 + 3 + 3


def lavin_answer(item: B.Item, otherwise: str | None = None) -> str | None:
    """LaVIN's answer to ``item`` in the tool's example (``otherwise`` for a question not in it)."""
    question = [q for q, _ in Y._mme_lines(item.source)][item.index - 1]
    category = item.meta["category"]
    rows = _lavin(category) if category in LAVIN else []
    found = [r[3] for r in rows if (Path(r[0]).stem, r[1]) == (Path(item.unit).stem, question)]
    return found[0] if found else otherwise


def test_mme_whole_run_headline_is_the_total(tmp_path, llava_eval_dir, monkeypatch):
    """Through ``forgetless eval`` with the LaVIN answers (and "Yes" elsewhere) given as the model's: the
    headline is calculation.py's total, the recorded answers score again to the recorded values, and a result
    compared with itself changes by 0."""
    root = write_mme(tmp_path / "mme")

    def canned(model, encoder, samples, max_new_tokens=32, batch_size=8):
        return [lavin_answer(s, "Yes") for s in samples]

    monkeypatch.setattr(harness, "generate_answers", canned)
    res = whole_run(llava_eval_dir, "mme", root, tmp_path)
    entry, official = res["tasks"]["mme"], res["benchmarks"]["mme"]
    others = 50.0  # "Yes" to (Yes, No): acc 1/2, acc+ 0
    assert official["perception"] == pytest.approx(187.5 + 8 * others)
    assert official["cognition"] == pytest.approx(250 / 3 + 3 * others)
    assert official["value"] == pytest.approx(official["total"], rel=1e-12)
    assert entry["accuracy"] * Y.MME_SCALE == pytest.approx(official["total"], rel=1e-12)
    assert official["interval"][0] <= official["value"] <= official["interval"][1]
    items = Y.read_mme(root)
    again = Y.score_mme(items, [p["prediction"] for p in entry["predictions"]])
    assert entry["item_scores"] == pytest.approx(again.values, abs=0) and entry["n"] == 21


def test_mme_generated_answers_on_a_tiny_llava(tmp_path, llava_eval_dir):
    """The model's own answers to the first 8 images (existence's, count's 4, position's, color's, posters' in
    images/): rescored, they give the recorded values and the headline."""
    root = write_mme(tmp_path / "mme")
    kw = {"limit": 8, "max_new_tokens": 3, "device": "cpu", "progress": False, "log": None}
    res = run_eval(llava_eval_dir, None, None, benchmarks=[("mme", root)], **kw)
    entry, official = res["tasks"]["mme"], res["benchmarks"]["mme"]
    items = Y.read_mme(root)[:16]
    assert items[-1].unit == "posters/images/q.jpg" and entry["n"] == 8
    assert [p["id"] for p in entry["predictions"]] == [it.id for it in items]
    again = Y.score_mme(items, [p["prediction"] for p in entry["predictions"]])
    assert item_correct(entry).tolist() == pytest.approx(again.values, abs=0)
    assert official["value"] == pytest.approx(again.official["total"], rel=1e-12, abs=1e-12)


def whole_run(model: Path, name: str, folder: Path, tmp_path: Path, **options) -> dict:
    """``forgetless eval`` on one benchmark; then again with that result as ``--base``, which must change the
    headline by exactly 0."""
    kw = {"device": "cpu", "progress": False, "log": None, **options}
    res = run_eval(model, None, None, benchmarks=[(name, folder)], **kw)
    base = tmp_path / f"{name}-base.json"
    base.write_text(json.dumps({**res, "path": str(base)}))
    again = run_eval(model, None, None, benchmarks=[(name, folder)], base=base, **kw)
    assert again["benchmarks"][name]["vs_base"] == {"value": 0.0, "interval": [0.0, 0.0]}
    return res


# ----------------------------------------------------------------------------------------------------------------
# POPE

POPE = {  # split: (image, question, label) — POPE's coco_pope_<split>.json lines
    "adversarial": [
        ("a.jpg", "Is there a dog in the image?", "yes"),
        ("a.jpg", "Is there a car in the image?", "no"),
    ]
    * 2,
    "popular": [
        ("b.jpg", "Is there a cat in the image?", "yes"),
        ("b.jpg", "Is there a bus in the imange?", "no"),
    ]
    * 2,
    "random": [
        ("a.jpg", "Is there a dog in the image?", "yes"),
        ("b.jpg", "Is there a car in the image?", "no"),
    ]
    + [("b.jpg", "Is there a kite in the image?", "no")],
}


def write_pope(folder: Path, annotations: str = "coco") -> Path:
    """LLaVA's layout: coco/coco_pope_<split>.json (POPE's output/coco) and val2014/ of COCO images."""
    (folder / annotations).mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        write_image(folder / "val2014" / name)
    for split, rows in POPE.items():
        lines = [
            json.dumps({"question_id": k, "image": image, "text": text, "label": label})
            for k, (image, text, label) in enumerate(rows, 1)
        ]
        (folder / annotations / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return folder


def test_pope_reads_llava_layout_with_llava_prompts(tmp_path):
    folder = write_pope(tmp_path / "pope")
    items = Y.read_pope(folder)
    assert [it.id for it in items[:2]] == ["adversarial/1", "adversarial/2"] and items[-1].id == "random/3"
    assert [it.unit for it in items] == [it.id for it in items] and len(items) == 11
    assert items[5].turns == [("user", "Is there a bus in the imange?" + SUFFIX), ("assistant", "no")]
    assert items[5].image == folder.resolve() / "val2014" / "b.jpg" and items[5].meta == {
        "split": "popular",
        "label": "no",
    }
    flat = write_pope(tmp_path / "flat", annotations=".")  # the three files in the folder itself
    assert [it.turns for it in Y.read_pope(flat)] == [it.turns for it in items]


def test_pope_refusals_name_the_file(tmp_path):
    folder = write_pope(tmp_path / "pope")
    random = folder / "coco" / "coco_pope_random.json"
    good = random.read_text()
    bad = {
        "not json\n": "invalid JSON",
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}\n': "lacks one of",
        good.replace('"no"', '"No"', 1): "other than yes/no",
        good + good.splitlines()[0] + "\n": "question_id 1 given twice",
    }
    for text, problem in bad.items():
        random.write_text(text)
        with pytest.raises(ForgetlessError, match=problem) as e:
            Y.read_pope(folder)
        assert str(random) in str(e.value)
    random.unlink()
    with pytest.raises(ForgetlessError, match="no coco_pope_random.json"):
        Y.read_pope(folder)
    random.write_text(good)
    (folder / "val2014" / "a.jpg").unlink()
    (folder / "val2014" / "b.jpg").unlink()
    (folder / "val2014").rmdir()
    with pytest.raises(ForgetlessError, match="no val2014/"):
        Y.read_pope(folder)


def test_pope_answers_are_read_as_eval_pope_reads_them():
    cases = {
        "Yes": "yes",
        "No": "no",
        "No.": "no",
        "no, there is none.": "no",
        "There is not a dog.": "no",
        "Yes, but not clearly.": "no",  # "not" in the first sentence
        "Yes. There is no dog.": "yes",  # only the first sentence counts
        "NO": "yes",  # only "No", "no" and "not" count
        "nothing": "yes",
        "": "yes",
    }
    assert {text: Y.pope_answer(text) for text in cases} == cases


def test_pope_metrics_worked_by_hand(tmp_path):
    items = Y.read_pope(write_pope(tmp_path / "pope"))
    predictions = ["Yes", "Yes", "No", "No"] + ["Yes", "No", "Yes", "No."] + ["Yes", "Yes", "No"]
    s = Y.score_pope(items, predictions)
    adv, pop, rnd = (s.official["splits"][k] for k in Y.POPE_SPLITS)
    # adversarial: labels y n y n, answers y y n n → TP 1, FP 1, TN 1, FN 1
    assert adv == {
        "n": 4,
        "TP": 1,
        "FP": 1,
        "TN": 1,
        "FN": 1,
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "yes_ratio": 0.5,
    }
    assert (pop["accuracy"], pop["f1"], pop["yes_ratio"]) == (1.0, 1.0, 0.5)
    # random: labels y n n, answers y y n → TP 1, FP 1, TN 1: precision 1/2, recall 1, F1 2·(1/2)/(3/2) = 2/3
    assert (rnd["TP"], rnd["FP"], rnd["TN"], rnd["FN"]) == (1, 1, 1, 0)
    assert (rnd["precision"], rnd["recall"]) == (0.5, 1.0) and rnd["f1"] == pytest.approx(2 / 3)
    assert rnd["accuracy"] == pytest.approx(2 / 3) and rnd["yes_ratio"] == pytest.approx(2 / 3)
    assert s.official["mean_over_splits"]["f1"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert s.values == [1.0, 0.0, 0.0, 1.0] + [1.0] * 4 + [1.0, 0.0, 1.0]
    assert s.correct == [v == 1 for v in s.values]
    none = Y.score_pope(items[-3:], ["No"] * 3).official["splits"]["random"]  # eval_pope.py divides by zero
    assert (none["precision"], none["recall"], none["f1"], none["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_pope_whole_run_on_a_tiny_llava(tmp_path, llava_eval_dir):
    folder = write_pope(tmp_path / "pope")
    res = whole_run(llava_eval_dir, "pope", folder, tmp_path, max_new_tokens=3)
    entry, official = res["tasks"]["pope"], res["benchmarks"]["pope"]
    texts = [p["prediction"] for p in entry["predictions"]]
    again = Y.score_pope(Y.read_pope(folder), texts)
    assert entry["correct_items"] == "".join("1" if v else "0" for v in again.values) and entry["n"] == 11
    assert official["value"] == pytest.approx(100 * sum(again.values) / 11, rel=1e-12)
    assert official["splits"] == again.official["splits"]
