"""VQAv2, TextVQA and GQA (forgetless.eval.benchmarks.vqa): the files read in each published layout, the prompts,
the official answer normalisation on strings from the official tables, the VQA accuracy on hand-computed worked
examples, GQA's figures by hand, and end-to-end runs whose recorded answers score again to the recorded values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from forgetless.errors import ForgetlessError
from forgetless.eval import benchmarks as B
from forgetless.eval.benchmarks import vqa as V
from forgetless.eval.metrics import item_correct
from forgetless.eval.report import run_eval

SUFFIX = "\nAnswer the question using a single word or phrase."
FILLERS = ["blue", "pink", "green", "cat", "dog", "tree", "car", "sky", "sea", "sun"]


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (20, 120, 200)).save(path, format="JPEG")


def _humans(answer: str, k: int) -> list[str]:
    """Ten human answers, ``k`` of them ``answer`` and the rest all different."""
    return [answer] * k + FILLERS[: 10 - k]


# ----------------------------------------------------------------------------------------------------------------
# writers of each published layout


def write_vqav2(folder: Path, rows, split="val2014", api=False, annotated=True) -> Path:
    """VQAv2 as the VQA site's zips unpack (flat) or as its API lays it out (Questions/, Annotations/, Images/)."""
    qdir, adir = (folder / "Questions", folder / "Annotations") if api else (folder, folder)
    images = folder / ("Images/mscoco/" + split if api else split)
    qs, anns = [], []
    for qid, image_id, question, humans in rows:
        qs.append({"image_id": image_id, "question": question, "question_id": qid})
        anns.append(
            {
                "question_type": question.split()[0].lower(),
                "multiple_choice_answer": humans[0],
                "answers": [
                    {"answer": h, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, h in enumerate(humans)
                ],
                "image_id": image_id,
                "answer_type": "yes/no" if humans[0] in ("yes", "no") else "other",
                "question_id": qid,
            }
        )
        _png(images / f"COCO_{split}_{image_id:012d}.jpg")
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
        json.dumps({"task_type": "Open-Ended", "data_subtype": split, "questions": qs})
    )
    if annotated:
        adir.mkdir(parents=True, exist_ok=True)
        (adir / f"v2_mscoco_{split}_annotations.json").write_text(
            json.dumps({"data_subtype": split, "annotations": anns})
        )
    return folder


VQA_ROWS = [
    (42000, 42, "What color is the bus?", _humans("red", 3)),
    (42001, 42, "How many people are there?", _humans("two", 2)),
    (73000, 73, "Is it raining?", ["yes"] * 10),
]


def write_textvqa(folder: Path, rows, ocr: list[dict] | None = None) -> Path:
    """TextVQA_0.5.1_val.json with train_images/ (and LLaVA's OCR-prompt file when ``ocr`` is given)."""
    data = [
        {
            "question": q,
            "image_id": image_id,
            "image_classes": ["Poster"],
            "answers": humans,
            "question_tokens": q.split(),
            "question_id": qid,
            "set_name": "val",
        }
        for qid, image_id, q, humans in rows
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "TextVQA_0.5.1_val.json").write_text(
        json.dumps(
            {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
        )
    )
    for _, image_id, _, _ in rows:
        _png(folder / "train_images" / f"{image_id}.jpg")
    if ocr is not None:
        (folder / V.OCR_FILE).write_text("".join(json.dumps(r) + "\n" for r in ocr))
    return folder


TEXT_ROWS = [
    (0, "003a8ae2ef43b901", "what is the brand of this camera?", _humans("dakota", 4)),
    (1, "b9dc400eb20bad64", "what does the small white text spell?", _humans("copenhagen", 1)),
    (2, "b9dc400eb20bad64", "what year is shown?", _humans("1,999", 3)),
]
OCR_LINES = [  # LLaVA's lines: "question_id" holds the image id, the question capitalised, OCR tokens or none
    {
        "question_id": "003a8ae2ef43b901",
        "image": "003a8ae2ef43b901.jpg",
        "text": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use"
        + SUFFIX,
        "category": "default",
    },
    {
        "question_id": "b9dc400eb20bad64",
        "image": "b9dc400eb20bad64.jpg",
        "text": "What does the small white text spell?\nReference OCR token: D, RUPALCON, COPENHAGEN"
        + SUFFIX,
        "category": "default",
    },
    {
        "question_id": "b9dc400eb20bad64",
        "image": "b9dc400eb20bad64.jpg",
        "text": "What year is shown?" + SUFFIX,
        "category": "default",
    },
]


def _gqa_question(question, answer, structural, semantic, image="n161313", group=None, balanced=True, ops=()):
    return {
        "semantic": [{"operation": o, "dependencies": [], "argument": a} for o, a in ops],
        "entailed": [],
        "equivalent": [],
        "question": question,
        "imageId": image,
        "isBalanced": balanced,
        "groups": {"global": group, "local": "x"},
        "answer": answer,
        "types": {"structural": structural, "semantic": semantic, "detailed": semantic + structural},
        "fullAnswer": answer,
    }


GQA_QUESTIONS = {
    "201307251": _gqa_question(
        "Is the sky dark?",
        "yes",
        "verify",
        "attr",
        ops=[("select", "sky (2486325)"), ("verify color", "dark")],
    ),
    "201640614": _gqa_question(
        "Who is wearing the shirt?",
        "girl",
        "query",
        "rel",
        image="n235859",
        group="person",
        ops=[("select", "shirt (1)"), ("relate", "person,wearing,s (2)"), ("query", "name")],
    ),
    "202225914": _gqa_question(
        "What is the man holding?",
        "umbrella",
        "query",
        "rel",
        group="thing",
        ops=[("select", "man (3)"), ("relate", "_,holding,o (4)"), ("query", "name")],
    ),
    "05515938": _gqa_question(
        "Is there a cat or a dog?", "no", "logical", "obj", ops=[("exist", "cat (5)"), ("exist", "dog (6)")]
    ),
    "99999999": _gqa_question("Unbalanced question?", "no", "verify", "attr", balanced=False),
}


def write_gqa(folder: Path, questions=GQA_QUESTIONS, choices=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    if choices is not None:
        (folder / "testdev_balanced_choices.json").write_text(json.dumps(choices))
    for q in questions.values():
        _png(folder / "images" / f"{q['imageId']}.jpg")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# the official normalisation


@pytest.mark.parametrize(
    ("text", "punctuated"),
    [
        ("1,000", "1000"),  # a digit-comma-digit anywhere: every mark is deleted, not spaced
        ("red, white", "red white"),  # a mark beside a space is deleted ...
        ("black/white", "black white"),  # ... any other becomes a space
        ("yes!", "yes "),
        ("3.5 m.", "3.5 m"),  # a period goes unless a digit follows it
        ("e.g.", "eg"),
        ("don't", "don't"),  # the apostrophe is no mark here
        ("." * 40 + "x", "." * 8 + "x"),  # sub() is passed re.UNICODE (32) as its count: 32 periods go
    ],
)
def test_process_punctuation(text, punctuated):
    assert V.process_punctuation(text) == punctuated


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two Dogs", "2 dogs"),
        ("the dog", "dog"),
        ("a an the", ""),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the number words stop at ten
        ("dont", "don't"),
        ("yall'd've", "y'all'd've"),
        ("couldnt've", "couldn't've"),
        ("twas", "'twas"),
        ("somebody'd", "somebodyd"),  # the official table's own entry, backwards
        ("Im", "im"),  # lower-cased first, so the table's capitalised keys never match
        ("wed", "wed"),  # words the table leaves alone
    ],
)
def test_process_digit_article(text, normalised):
    assert V.process_digit_article(text) == normalised


def test_the_contractions_table_is_the_official_one():
    table = V.CONTRACTIONS
    assert len(table) == 120  # the official dict's entries, counted
    some = {
        "aint": "ain't",
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "Id've": "I'd've",
        "'ows'at": "'ow's'at",
        "ow's'at": "'ow's'at",
        "let's": "let's",
        "she's": "she's",
        "weve": "we've",
        "y'allll": "y'all'll",
        "youve": "you've",
    }
    assert {k: table[k] for k in some} == some
    assert not {"wed", "id", "ill", "well", "its", "shed", "hell", "were", "lets", "shes"} & table.keys()
    assert V.NUMBERS == {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }


@pytest.mark.parametrize(
    ("text", "processed"),
    [
        ("Yes", "yes"),
        ("It's a DOG.", "it 's dog"),  # "'s" split off, article dropped, period gone
        ("10,000?", "10000"),
        ("Coca-Cola", "coca cola"),
        ("Two.\n", "2"),
        ("t-shirt!", "t shirt"),
    ],
)
def test_llava_evalai_answer_processor(text, processed):
    assert V.evalai_answer(text) == processed


# ----------------------------------------------------------------------------------------------------------------
# the VQA accuracy, by hand


@pytest.mark.parametrize(("k", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_vqa_accuracy_worked_examples(k, accuracy):
    """k of 10 humans gave the answer. Leaving out each human in turn: the k subsets without a matching human see
    k - 1 matches, the 10 - k others see k, so the accuracy is (k·min(1, (k-1)/3) + (10-k)·min(1, k/3)) / 10:
    1 → 9·(1/3)/10 = 0.3; 2 → (2·1/3 + 8·2/3)/10 = 0.6; 3 → (3·2/3 + 7)/10 = 0.9; 4 → (4·1 + 6·1)/10 = 1."""
    humans = _humans("two", k)
    assert V.vqa_accuracy("two", humans) == pytest.approx(accuracy, abs=1e-12)
    assert V.vqa_accuracy("Two", humans) == pytest.approx(accuracy, abs=1e-12)  # normalised: humans disagree
    assert V.textvqa_accuracy("2", humans) == pytest.approx(accuracy, abs=1e-12)
    assert V.textvqa_accuracy("Blue", humans) == pytest.approx(0.3, abs=1e-12)  # one human said blue


def test_vqa_normalises_only_when_the_humans_disagree_and_textvqa_always():
    """vqaEval.py normalises answers only where the ten humans differ: against ten "yes", a raw "Yes" scores 0;
    LLaVA's answer processing (applied before submission) lower-cases it first. TextVQA's evaluator normalises
    both sides always: ten "Coca-Cola" match "coca cola" there, not in VQAEval."""
    assert V.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert V.vqa_accuracy(V.evalai_answer("Yes"), ["yes"] * 10) == 1.0
    assert V.vqa_accuracy(V.evalai_answer("Coca-Cola"), ["Coca-Cola"] * 10) == 0.0
    assert V.textvqa_accuracy("Coca-Cola", ["Coca-Cola"] * 10) == 1.0
    assert V.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # both sides are stripped, tabs and newlines spaced


def test_score_vqav2_figures_by_hand(tmp_path):
    items = V.read_vqav2(write_vqav2(tmp_path / "vqav2", VQA_ROWS))
    scored = V.score_vqav2(items, ["Red.", "2", "Yes"])  # 3 of 10 say red, 2 say two, 10 say yes
    assert scored.values == pytest.approx([0.9, 0.6, 1.0], abs=1e-12)
    assert scored.correct == [False, False, True]
    assert scored.official == {
        "overall": round(100 * (0.9 + 0.6 + 1.0) / 3, 2),
        "perQuestionType": {"what": 90.0, "how": 60.0, "is": 100.0},
        "perAnswerType": {"other": 75.0, "yes/no": 100.0},
    }


# ----------------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("api", [False, True])
def test_read_vqav2_in_both_layouts(tmp_path, api):
    folder = write_vqav2(tmp_path / "vqav2", VQA_ROWS, api=api)
    write_vqav2(folder, VQA_ROWS[:1], split="train2014", api=api)  # another annotated split: val2014 is read
    items = V.read_vqav2(folder)
    assert [it.id for it in items] == ["42000", "42001", "73000"] == [it.unit for it in items]
    assert [it.turns for it in items] == [
        [("user", "What color is the bus?" + SUFFIX), ("assistant", "red")],
        [("user", "How many people are there?" + SUFFIX), ("assistant", "two")],
        [("user", "Is it raining?" + SUFFIX), ("assistant", "yes")],
    ]
    images = folder / ("Images/mscoco/val2014" if api else "val2014")
    assert [it.image for it in items] == [
        images.resolve() / "COCO_val2014_000000000042.jpg",
        images.resolve() / "COCO_val2014_000000000042.jpg",
        images.resolve() / "COCO_val2014_000000000073.jpg",
    ]
    assert all(it.image.is_absolute() and it.image.is_file() for it in items)
    assert items[1].meta["answers"] == _humans("two", 2)


def test_vqav2_refusals(tmp_path):
    testdev = write_vqav2(tmp_path / "testdev", VQA_ROWS, split="test-dev2015", annotated=False)
    with pytest.raises(ForgetlessError, match="EvalAI") as e:
        V.read_vqav2(testdev)
    assert str(testdev) in str(e.value) and "test-dev2015" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgetlessError, match="v2_OpenEnded_mscoco_<split>_questions.json"):
        V.read_vqav2(tmp_path / "empty")
    noimages = write_vqav2(tmp_path / "noimages", VQA_ROWS)
    for p in (noimages / "val2014").iterdir():
        p.unlink()
    (noimages / "val2014").rmdir()
    with pytest.raises(ForgetlessError, match="no image folder val2014"):
        V.read_vqav2(noimages)
    partial = write_vqav2(tmp_path / "partial", VQA_ROWS)
    ann = partial / "v2_mscoco_val2014_annotations.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({"annotations": data["annotations"][:2]}))
    with pytest.raises(ForgetlessError, match="no annotation for question 73000") as e:
        V.read_vqav2(partial)
    assert str(ann) in str(e.value)


def test_records_without_their_fields_are_refused_naming_the_file(tmp_path):
    folder = write_vqav2(tmp_path / "vqav2", VQA_ROWS)
    ann = folder / "v2_mscoco_val2014_annotations.json"
    data = json.loads(ann.read_text())
    del data["annotations"][1]["answers"]
    ann.write_text(json.dumps(data))
    with pytest.raises(ForgetlessError, match="lacks a field.*'answers'") as e:
        V.read_vqav2(folder)
    assert str(ann) in str(e.value)
    gqa = write_gqa(tmp_path / "gqa", {"1": {"question": "Is it?", "answer": "yes", "imageId": "n1"}})
    with pytest.raises(ForgetlessError, match="'types'") as e:
        V.read_gqa(gqa)
    assert "testdev_balanced_questions.json" in str(e.value)
    write_gqa(tmp_path / "choices", choices={"201307251": {"valid": [], "plausible": []}})
    with pytest.raises(ForgetlessError, match="lacks a field") as e:
        V.read_gqa(tmp_path / "choices")
    assert "testdev_balanced_choices.json" in str(e.value)


def test_read_textvqa_plain_and_with_llava_ocr_prompts(tmp_path):
    folder = write_textvqa(tmp_path / "textvqa", TEXT_ROWS, OCR_LINES)
    plain = V.read_textvqa(folder)
    assert [it.id for it in plain] == ["0", "1", "2"]
    assert [it.turns[0][1] for it in plain] == [
        "What is the brand of this camera?" + SUFFIX,
        "What does the small white text spell?" + SUFFIX,
        "What year is shown?" + SUFFIX,
    ]
    assert [it.turns[1][1] for it in plain] == ["dakota", "copenhagen", "1,999"]
    assert plain[0].image == (folder / "train_images" / "003a8ae2ef43b901.jpg").resolve()
    ocr = V.read_textvqa_ocr(folder)
    assert [it.id for it in ocr] == ["0", "1", "2"]
    assert [it.turns[0][1] for it in ocr] == [r["text"] for r in OCR_LINES]
    assert [it.meta["answers"] for it in ocr] == [r[3] for r in TEXT_ROWS]
    assert ocr[2].image == plain[2].image


def test_textvqa_ocr_joins_as_eval_textvqa_does(tmp_path):
    """Two lines asking the same question of the same image both get the annotation read last (its dict)."""
    rows = [*TEXT_ROWS, (3, "003a8ae2ef43b901", "What is the brand of this camera?", _humans("kodak", 5))]
    folder = write_textvqa(tmp_path / "twice", rows, [OCR_LINES[0], *OCR_LINES])
    items = V.read_textvqa_ocr(folder)
    assert [it.id for it in items] == ["3", "3#2", "1", "2"]
    assert items[0].meta["answers"] == items[1].meta["answers"] == _humans("kodak", 5)


def test_textvqa_refusals(tmp_path):
    bad = write_textvqa(tmp_path / "nine", [(7, "abc", "what?", FILLERS[:9])])
    with pytest.raises(ForgetlessError, match="question 7 has 9 answers, not 10") as e:
        V.read_textvqa(bad)
    assert "TextVQA_0.5.1_val.json" in str(e.value)
    plain = write_textvqa(tmp_path / "plain", TEXT_ROWS)
    with pytest.raises(ForgetlessError, match=V.OCR_FILE):
        V.read_textvqa_ocr(plain)
    stray = {**OCR_LINES[0], "text": "What is this?" + SUFFIX}
    other = write_textvqa(tmp_path / "other", TEXT_ROWS, [stray])
    with pytest.raises(ForgetlessError, match="line 1: no question") as e:
        V.read_textvqa_ocr(other)
    assert V.OCR_FILE in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgetlessError, match="TextVQA_0.5.1_val.json"):
        V.read_textvqa(tmp_path / "empty")


def test_read_gqa(tmp_path):
    folder = write_gqa(tmp_path / "gqa")
    items = V.read_gqa(folder)
    assert [it.id for it in items] == [
        "201307251",
        "201640614",
        "202225914",
        "05515938",
    ]  # unbalanced: left out
    assert items[0].turns == [("user", "Is the sky dark?" + SUFFIX), ("assistant", "yes")]
    assert items[1].image == (folder / "images" / "n235859.jpg").resolve()
    # steps: the program's operations less "exist", "query: name", "choose name"
    assert [it.meta["steps"] for it in items] == [2, 2, 2, 0]
    assert [it.meta["words"] for it in items] == [4, 5, 5, 7]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgetlessError, match="testdev_balanced_questions.json"):
        V.read_gqa(tmp_path / "empty")


def test_score_gqa_figures_by_hand(tmp_path):
    items = V.read_gqa(write_gqa(tmp_path / "gqa"))
    scored = V.score_gqa(
        items, ["Yes.", "girl", "Umbrella", "yes"]
    )  # convert_gqa_for_eval: rstrip('.'), lower
    assert scored.values == [1.0, 1.0, 1.0, 0.0]
    # distribution: groups person {girl: 1} and thing {umbrella: 1}, both predicted once: chi-square 0
    assert scored.official == {
        "binary": 50.0,
        "open": 100.0,
        "accuracy": 75.0,
        "distribution": 0.0,
        "accuracyPerStructuralType": {"logical": [0.0, 1], "query": [100.0, 2], "verify": [100.0, 1]},
        "accuracyPerSemanticType": {"attr": [100.0, 1], "obj": [0.0, 1], "rel": [100.0, 2]},
        "accuracyPerSteps": {"0": [0.0, 1], "2": [100.0, 3]},
        "accuracyPerLength": {"4": [100.0, 1], "5": [100.0, 2], "7": [0.0, 1]},
    }
    wrong = V.score_gqa(items, ["yes", "boy", "boy", "no"])
    # person: (0-1)²/1 = 1 over 1 question; thing: (0-1)²/1 = 1 over 1: weighted mean 1, /100
    assert wrong.official["distribution"] == pytest.approx(0.01, abs=1e-15)
    assert wrong.official["accuracy"] == 50.0 and "validity" not in wrong.official


def test_gqa_validity_and_plausibility_with_a_choices_file(tmp_path):
    questions = dict(list(GQA_QUESTIONS.items())[:2])
    questions["201640614"] = {**questions["201640614"], "types": {**questions["201640614"]["types"]}}
    questions["201640614"]["types"]["detailed"] = (
        "materialCommon"  # "Common": valid are color, material, shape
    )
    choices = {
        "201307251": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
        "201640614": {"valid": ["girl", "boy"], "plausible": ["girl"]},
    }
    items = V.read_gqa(write_gqa(tmp_path / "gqa", questions, choices))
    scored = V.score_gqa(items, ["maybe", "material"])
    assert scored.official["validity"] == 50.0 and scored.official["plausibility"] == 50.0
    assert scored.official["distribution"] == pytest.approx(0.01, abs=1e-15)


def test_the_benchmarks_are_registered():
    assert {"vqav2", "textvqa", "textvqa_ocr", "gqa"} <= set(B.names())
    assert all(B.get(n).max_new_tokens == 16 and B.get(n).scale == 100.0 for n in ("vqav2", "gqa"))


# ----------------------------------------------------------------------------------------------------------------
# end to end


def _folder(name: str, root: Path) -> Path:
    if name == "vqav2":
        return write_vqav2(root / name, VQA_ROWS)
    if name == "gqa":
        return write_gqa(root / name)
    return write_textvqa(root / name, TEXT_ROWS, OCR_LINES)


@pytest.mark.parametrize("name", ["vqav2", "textvqa", "textvqa_ocr", "gqa"])
def test_end_to_end_scores_what_it_recorded(tmp_path, llava_eval_dir, name):
    data = _folder(name, tmp_path)
    res = run_eval(
        llava_eval_dir, None, None, benchmarks=[(name, data)], device="cpu", progress=False, log=None
    )
    entry, official = res["tasks"][name], res["benchmarks"][name]
    bench = B.get(name)
    items = bench.read(data)
    texts = [p["prediction"] for p in entry["predictions"]]
    scored = bench.score(items, texts)
    assert item_correct(entry).tolist() == scored.values and entry["n"] == len(items)
    assert entry["accuracy"] * 100 == pytest.approx(official["value"], rel=1e-12)
    figure = {"vqav2": "overall", "gqa": "accuracy", "textvqa": "accuracy", "textvqa_ocr": "accuracy"}[name]
    assert official[figure] == pytest.approx(official["value"], abs=0.005 if name == "vqav2" else 1e-9)


def _fixed(answer: str) -> bool:
    """Whether LLaVA's processing and the official normalisation leave ``answer`` as it is."""
    return V.evalai_answer(answer) == answer == V.process_digit_article(V.process_punctuation(answer))


def test_end_to_end_vqa_accuracy_and_a_base_of_itself(tmp_path, llava_eval_dir):
    """The model's own answers put among the human answers 2, 3 and 10 times: 0.6, 0.9 and 1.0 through the
    whole run."""
    run = {"device": "cpu", "progress": False, "log": None}
    first = run_eval(llava_eval_dir, None, None, benchmarks=[("vqav2", _folder("vqav2", tmp_path))], **run)
    said = [V.evalai_answer(p["prediction"]) for p in first["tasks"]["vqav2"]["predictions"]]
    if not all(_fixed(s) and s not in FILLERS for s in said):
        pytest.skip(f"the tiny model's answers {said} are no fixed points of the normalisation")
    rows = [(qid, img, q, _humans(s, k)) for (qid, img, q, _), s, k in zip(VQA_ROWS, said, (2, 3, 10))]
    data = write_vqav2(tmp_path / "again", rows)
    res = run_eval(llava_eval_dir, None, None, benchmarks=[("vqav2", data)], **run)
    assert res["tasks"]["vqav2"]["item_scores"] == pytest.approx([0.6, 0.9, 1.0], abs=1e-12)
    assert res["benchmarks"]["vqav2"]["value"] == pytest.approx(100 * 2.5 / 3, rel=1e-12)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**res, "path": str(base)}))
    again = run_eval(llava_eval_dir, None, None, benchmarks=[("vqav2", data)], base=base, **run)
    assert again["benchmarks"]["vqav2"]["vs_base"] == {"value": 0.0, "interval": [0.0, 0.0]}
