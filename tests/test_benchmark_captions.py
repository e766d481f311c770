"""COCO and Flickr30k captions (forgetless.eval.benchmarks.captions): the Karpathy split files and COCO's caption
annotations read in their published layouts with lmms-eval's prompts, the PTB tokenization against the output of
coco-caption's Java PTBTokenizer, CIDEr-D worked by hand (IDF, clipping, the length penalty on bigram counts) and
against pycocoevalcap, the refusals, and whole runs through ``forgetless eval``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from forgetless.errors import ForgetlessError
from forgetless.eval import benchmarks as B
from forgetless.eval import harness
from forgetless.eval.benchmarks import captions as C
from forgetless.eval.report import run_eval

pytest.importorskip("pycocoevalcap")

# (caption, what coco-caption's PTBTokenizer.tokenize returns for it): the right side is the output of
# stanford-corenlp-3.4.1.jar (-preserveLines -lowerCase) with PUNCTUATIONS removed, as pycocoevalcap 1.2 ran it.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The colour of the T-shirt is grey, isn't it?", "the colour of the t-shirt is grey is n't it"),
    (
        'He said "hello" (twice) [maybe] {ok} and/or 3.5 ft * 2 = $5.00 & more...',
        "he said hello -lrb- twice -rrb- -lsb- maybe -rsb- -lcb- ok -rcb- and/or 3.5 ft * 2 = $ 5.00 & more",
    ),
    (
        "Mr. Smith's dog can't run -- it's 10:30 a.m. in the U.S.",
        "mr. smith 's dog ca n't run it 's 10:30 a.m. in the u.s.",
    ),
    (
        "A cat; a dog: two animals! don't won't gonna cannot I'm you're we'll they'd",
        "a cat a dog two animals do n't wo n't gon na can not i 'm you 're we 'll they 'd",
    ),
    ("the man isn\u2019t here, it\u2019s ok. the dogs' toys", "the man is n't here it 's ok the dogs toys"),
    ("a sign reading \u201cno parking\u201d and 'keep out'.", "a sign reading no parking and keep out"),
    ("a photo of a cat..", "a photo of a cat"),
    ("apples, bananas, etc...", "apples bananas etc."),
    ("hello world!!! what?! yes??", "hello world !!! what ?! yes ??"),
    ("a dog\u2014a cat \u2013 here", "a dog a cat here"),
    ("100 % 5 $ us$5 \u20ac5 \u00a35 5\u20ac", "100 % 5 $ us $ 5 $ 5 # 5 5 $"),
    ("at 3:00pm, a 1,000-year-old tree", "at 3:00 pm a 1,000-year-old tree"),
    ("the letter a. vitamin c. no. 5", "the letter a. vitamin c. no. 5"),
    ("a 5. and 3.", "a 5 and 3"),
    ("'tis a 'big' dog, 'twas", "'t is a big dog 't was"),
    ("Two   men\tin a  caf\u00e9\n", "two men in a caf\u00e9"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "tokens"), PTB_CASES)
def test_ptb_tokenize_matches_coco_captions_tokenizer(text, tokens):
    assert C.ptb_tokenize(text) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's PTBTokenizer runs Java")
def test_ptb_tokenize_matches_the_java_tokenizer_it_replaces():
    """The same captions (and LLaVA-style ones) through pycocoevalcap's own PTBTokenizer, run now."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [t for t, _ in PTB_CASES if t.strip()] + [
        "The image features a large, white dog lying on a couch next to a remote control.",
        "A street sign that reads \"Main St.\" on a pole; it's a 2-year-old's toy (probably).",
        "A kitchen with stainless steel appliances: a modern design - very clean!",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [C.ptb_tokenize(t) for t in texts] == [java[i][0] for i in range(len(texts))]


def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer import ptbtokenizer

    assert list(C.PUNCTUATIONS) == ptbtokenizer.PUNCTUATIONS


# ----------------------------------------------------------------------------------------------------------------
# CIDEr-D


def _items(refs: list[list[str]]) -> list[C.Item]:
    return [C._item(f"i{k}", Path(f"/x/{k}.jpg"), C.CAPTION_PROMPT, r) for k, r in enumerate(refs)]


def test_cider_d_worked_by_hand():
    """Two images, one reference each. N = 2 documents: "a" (in both) has IDF log 2 − log 2 = 0, every other
    n-gram log 2 − log 1. "a dog" for "a dog": cosine 1 for unigrams and bigrams, no trigrams or 4-grams:
    10 · (1 + 1 + 0 + 0) / 4 = 5. "a cat cat" for "a cat": unigrams min(2 log 2, log 2) · log 2 /
    (2 log 2 · log 2) = 1/2, bigrams log² 2 / (√2 log 2 · log 2) = 1/√2, a trigram the reference lacks (0); the
    length penalty counts bigrams (coco-caption's ``length`` is taken at n == 1): 2 against 1, exp(−1/72)."""
    s = C.score_captions(_items([["A cat."], ["A dog."]]), ["A cat cat", "a dog"])
    cat = 10 * (0.5 + 1 / math.sqrt(2) + 0 + 0) / 4 * math.exp(-1 / 72)
    assert s.values == pytest.approx([cat, 5.0], rel=1e-12)
    assert s.official["CIDEr"] == pytest.approx((cat + 5.0) / 2, rel=1e-12)
    assert s.correct == [True, True] and s.official["images"] == 2


def test_cider_d_one_image_is_zero_and_references_are_averaged():
    """One image: every IDF is log 1 − log 1 = 0 (the IDF comes from the images scored, so --limit changes it).
    Several references: the per-reference scores are averaged."""
    assert C.score_captions(_items([["a cat", "a dog"]]), ["a cat"]).values == [0.0]
    empty = C.score_captions(_items([["a cat"], ["a dog"]]), ["", "..."])  # nothing left after tokenizing
    assert empty.values == [0.0, 0.0] and empty.correct == [False, False]
    two = C.score_captions(_items([["a cat", "the cat"], ["a dog"]]), ["a cat", "a dog"])
    # image 0: df(a) = 2, df(cat) = df(the) = df(a cat) = df(the cat) = 1; N = 2. Against "a cat": unigrams and
    # bigrams 1; against "the cat": unigrams log² 2 / (log 2 · √2 log 2) = 1/√2, bigrams 0.
    assert two.values[0] == pytest.approx(10 * ((1 + 1) / 4 + (1 / math.sqrt(2)) / 4) / 2, rel=1e-12)


def test_scores_are_pycocoevalcaps_on_its_tokenized_captions():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = [
        ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean."],
        ["Two dogs playing with a frisbee on the grass.", "Dogs run across a field chasing a toy."],
        ["A plate of food with broccoli and rice.", "A dinner plate with vegetables, rice and meat."],
    ]
    hyps = ["A man surfing a wave.", "Two dogs are playing in a field.", "A plate with rice and broccoli."]
    s = C.score_captions(_items(refs), hyps)
    gts = {k: [C.ptb_tokenize(r) for r in rs] for k, rs in enumerate(refs)}
    res = {k: [C.ptb_tokenize(h)] for k, h in enumerate(hyps)}
    cider, per = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert s.values == pytest.approx(list(per), abs=0) and s.official["CIDEr"] == pytest.approx(cider, abs=0)
    assert [s.official[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=0)
    assert s.official["CIDEr"] == pytest.approx(sum(s.values) / 3, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# the published layouts

KARPATHY_COCO = [  # (cocoid, split, sentences)
    (
        391895,
        "test",
        ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike."],
    ),
    (522418, "train", ["A woman wearing a net on her head cutting a cake. "]),
    (
        184613,
        "test",
        ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella."],
    ),
    (318219, "test", ["A young boy standing in front of a computer keyboard."]),
]


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (40, 120, 200)).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def _sentences(raws: list[str], imgid: int) -> list[dict]:
    return [
        {"tokens": r.lower().strip(" .").split(), "raw": r, "imgid": imgid, "sentid": 10 * imgid + k}
        for k, r in enumerate(raws)
    ]


def write_karpathy_coco(folder: Path) -> Path:
    images = []
    for k, (cocoid, split, raws) in enumerate(KARPATHY_COCO):
        sub = "train2014" if split == "train" else "val2014"
        name = f"COCO_{sub}_{cocoid:012d}.jpg"
        _png(folder / sub / name)
        images.append(
            {
                "filepath": sub,
                "sentids": [10 * k + j for j in range(len(raws))],
                "filename": name,
                "imgid": k,
                "split": split,
                "sentences": _sentences(raws, k),
                "cocoid": cocoid,
            }
        )
    (folder / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return folder


def write_karpathy_flickr(folder: Path) -> Path:
    rows = [
        ("1000092795", "test", ["Two young guys with shaggy hair look at their hands.", "Two friends."]),
        ("10002456", "val", ["Several men in hard hats."]),
        ("1000268201", "test", ["A child in a pink dress is climbing up a set of stairs."]),
    ]
    images = []
    for k, (stem, split, raws) in enumerate(rows):
        _png(folder / "flickr30k-images" / f"{stem}.jpg")
        images.append(
            {
                "sentids": [],
                "imgid": k,
                "sentences": _sentences(raws, k),
                "split": split,
                "filename": f"{stem}.jpg",
            }
        )
    (folder / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return folder


def write_coco_val(folder: Path, year: str = "2014") -> Path:
    images = [
        {"id": 391895, "file_name": f"COCO_val{year}_000000391895.jpg", "height": 16, "width": 16},
        {"id": 203564, "file_name": f"COCO_val{year}_000000203564.jpg", "height": 16, "width": 16},
    ]
    if year == "2017":
        images = [{**im, "file_name": f"{im['id']:012d}.jpg"} for im in images]
    annotations = [
        {"image_id": 203564, "id": 37, "caption": "A bicycle replica with a clock as the front wheel."},
        {
            "image_id": 391895,
            "id": 770337,
            "caption": "A man with a red helmet on a small moped on a dirt road. ",
        },
        {"image_id": 203564, "id": 181, "caption": "The bike has a clock as a tire."},
    ]
    for im in images:
        _png(folder / f"val{year}" / im["file_name"])
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (folder / "annotations" / f"captions_val{year}.json").write_text(json.dumps(data))
    return folder


def test_karpathy_coco_reads_the_test_split_with_lmms_eval_prompt(tmp_path):
    folder = write_karpathy_coco(tmp_path / "coco")
    items = B.get("coco-karpathy").read(folder)
    assert [it.id for it in items] == ["391895", "184613", "318219"] == [it.unit for it in items]
    assert all(it.turns[0] == ("user", "Describe the image briefly.") for it in items)
    assert items[0].turns[1] == ("assistant", KARPATHY_COCO[0][2][0])
    assert items[0].meta["references"] == KARPATHY_COCO[0][2]
    assert items[0].image == (folder / "val2014" / "COCO_val2014_000000391895.jpg").resolve()
    assert all(it.image.is_absolute() and it.image.is_file() for it in items)


def test_flickr30k_reads_the_test_split(tmp_path):
    folder = write_karpathy_flickr(tmp_path / "flickr")
    items = B.get("flickr30k").read(folder)
    assert [it.id for it in items] == ["1000092795", "1000268201"]
    assert items[0].turns[0] == ("user", "Provide a one-sentence caption for the provided image.")
    assert items[1].image == (folder / "flickr30k-images" / "1000268201.jpg").resolve()
    assert items[0].meta["references"] == [
        "Two young guys with shaggy hair look at their hands.",
        "Two friends.",
    ]


@pytest.mark.parametrize("year", ["2014", "2017"])
def test_coco_val_reads_the_caption_annotations(tmp_path, year):
    folder = write_coco_val(tmp_path / "coco", year)
    items = B.get(f"coco{year}-val").read(folder)
    assert [it.id for it in items] == ["391895", "203564"]
    assert items[1].meta["references"] == [
        "A bicycle replica with a clock as the front wheel.",
        "The bike has a clock as a tire.",
    ]
    assert items[0].turns == [
        ("user", C.CAPTION_PROMPT),
        ("assistant", "A man with a red helmet on a small moped on a dirt road. "),
    ]
    assert all(it.image.is_file() and it.image.parent.name == f"val{year}" for it in items)


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(ForgetlessError, match="dataset_coco.json") as e:
        B.get("coco-karpathy").read(tmp_path)
    assert e.value.file == str(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset_flickr30k.json").write_text("{not json")
    with pytest.raises(ForgetlessError, match="cannot read") as e:
        B.get("flickr30k").read(bad)
    assert e.value.file == str(bad / "dataset_flickr30k.json")
    (bad / "dataset_flickr30k.json").write_text(
        json.dumps({"images": [{"split": "test", "filename": "a.jpg"}]})
    )
    with pytest.raises(ForgetlessError, match="lacks 'sentences'"):
        B.get("flickr30k").read(bad)
    coco = write_coco_val(tmp_path / "coco")
    data = json.loads((coco / "annotations" / "captions_val2014.json").read_text())
    data["annotations"] = data["annotations"][:1]
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    with pytest.raises(ForgetlessError, match="image 391895 has no caption") as e:
        B.get("coco2014-val").read(coco)
    assert e.value.file == str(coco / "annotations" / "captions_val2014.json")


# ----------------------------------------------------------------------------------------------------------------
# whole runs

CANNED = {
    "391895": "A man riding a red moped on a dirt road.",
    "184613": "A boy holding an umbrella.",
    "318219": "A young boy in front of a computer.",
}


def test_whole_run_headline_is_cider_times_100(tmp_path, llava_eval_dir, monkeypatch):
    """Through ``forgetless eval`` with canned captions as the model's: the headline is CIDEr-D × 100 as
    pycocoevalcap computes it, the recorded captions score again to the recorded values, a result compared with
    itself changes by 0, and --limit 2 scores two images with their own IDF."""
    folder = write_karpathy_coco(tmp_path / "coco")

    def canned(model, encoder, samples, max_new_tokens=32, batch_size=8):
        assert max_new_tokens == C.MAX_NEW_TOKENS
        return [CANNED[s.unit] for s in samples]

    monkeypatch.setattr(harness, "generate_answers", canned)
    kw = {"device": "cpu", "progress": False, "log": None}
    res = run_eval(llava_eval_dir, None, None, benchmarks=[("coco-karpathy", folder)], **kw)
    entry, official = res["tasks"]["coco-karpathy"], res["benchmarks"]["coco-karpathy"]
    items = B.get("coco-karpathy").read(folder)
    again = C.score_captions(items, [p["prediction"] for p in entry["predictions"]])
    assert entry["item_scores"] == pytest.approx(again.values, abs=0) and entry["n"] == 3
    assert official["value"] == pytest.approx(100 * again.official["CIDEr"], rel=1e-12)
    assert entry["accuracy"] * 100 == pytest.approx(official["value"], rel=1e-12)
    assert official["Bleu_4"] == again.official["Bleu_4"] and official["headline"] == "CIDEr-D ×100"
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**res, "path": str(base)}))
    res2 = run_eval(llava_eval_dir, None, None, benchmarks=[("coco-karpathy", folder)], base=base, **kw)
    assert res2["benchmarks"]["coco-karpathy"]["vs_base"] == {"value": 0.0, "interval": [0.0, 0.0]}
    two = run_eval(llava_eval_dir, None, None, benchmarks=[("coco-karpathy", folder)], limit=2, **kw)
    first = C.score_captions(items[:2], [CANNED[it.unit] for it in items[:2]])
    assert two["tasks"]["coco-karpathy"]["item_scores"] == pytest.approx(first.values, abs=0)
    assert first.values != pytest.approx(again.values[:2])  # the IDF of two images is not that of three


def test_whole_run_generates_on_a_tiny_llava(tmp_path, llava_eval_dir):
    folder = write_karpathy_flickr(tmp_path / "flickr")
    kw = {"device": "cpu", "progress": False, "log": None, "max_new_tokens": 3}
    res = run_eval(llava_eval_dir, None, None, benchmarks=[("flickr30k", folder)], **kw)
    entry = res["tasks"]["flickr30k"]
    texts = [p["prediction"] for p in entry["predictions"]]
    again = C.score_captions(B.get("flickr30k").read(folder), texts)
    assert entry["accuracy"] == pytest.approx(sum(again.values) / 2, abs=0) and entry["n"] == 2
