"""COCO and Flickr30k captioning, scored by CIDEr-D as the COCO caption evaluation (coco-caption) computes it.

Four benchmarks, each read from the files their maintainers publish:

- ``coco-karpathy``: the Karpathy split file ``dataset_coco.json``, its ``test`` images (5000) under
  ``<filepath>/<filename>`` (``val2014/``), as most papers and lmms-eval's ``coco_karpathy_test`` evaluate;
- ``flickr30k``: the Karpathy split file ``dataset_flickr30k.json``, its ``test`` images (1000) in
  ``flickr30k-images/``;
- ``coco2014-val`` / ``coco2017-val``: COCO's own ``annotations/captions_val2014.json`` (or ``_val2017``) with the
  images in ``val2014/`` (``val2017/``), as lmms-eval's ``coco2014_cap_val`` / ``coco2017_cap_val``.

One item per image (its unit); the user turn is lmms-eval's prompt for the task, the assistant turn the image's first
reference caption, ``meta["references"]`` all of them. Scoring follows pycocoevalcap (the maintained PyPI release of
coco-caption): every caption PTB-tokenized and stripped of its punctuation list (:func:`ptb_tokenize`, in Python:
coco-caption runs Stanford's Java tokenizer), then ``Cider`` (CIDEr-D: n = 4, σ = 6, the IDF over the references of
the images scored, clipped tf-idf products, the Gaussian length penalty, ×10) and ``Bleu(4)`` of that package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...errors import ForgetlessError
from . import Benchmark, Item, Scored, need_file, register

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
KARPATHY_PROMPT = "Describe the image briefly."
MAX_NEW_TOKENS = 64

# pycocoevalcap/tokenizer/ptbtokenizer.py's PUNCTUATIONS: tokens dropped after tokenizing. Its bracket tokens are
# upper case, while the tokenizer runs with -lowerCase, so "-lrb-" and friends stay in the text.
PUNCTUATIONS = (
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
)


# ----------------------------------------------------------------------------------------------------------------
# PTB tokenization (Stanford CoreNLP 3.4.1's PTBTokenizer -preserveLines -lowerCase, as coco-caption runs it)

_UNICODE = str.maketrans(
    {
        "\u201c": ' "',  # curly double quotes become `` / '' by position, as straight ones
        "\u201d": '" ',
        "\u00ab": ' "',
        "\u00bb": '" ',
        "\u2018": "'",
        "\u2019": "'",
        "\u2014": " -- ",
        "\u2013": " -- ",
        "\u2026": " ... ",
        "\u20ac": "$",
        "\u00a3": "#",
        "\u00a0": " ",
    }
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
    "'tis": "'t is",
    "'twas": "'t was",
}
# words kept with their final period (PTBLexer's abbreviations; single letters and acronyms are kept too)
_TITLES = {"mr", "mrs", "ms", "dr", "st", "prof", "jr", "sr", "gen", "gov", "sen", "rep", "col", "capt", "lt"}
_MONTHS = {"jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_ABBREVIATIONS = frozenset(
    {*_TITLES, *_MONTHS, "etc", "co", "inc", "ltd", "corp", "mt", "ft", "sq", "ave", "blvd", "vs", "rd"}
)
_KEPT_QUOTE_WORDS = frozenset({"'em", "'cause", "'n'", "'s", "'m", "'re", "'ve", "'ll", "'d"})
_SUBSTITUTIONS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"(?<!`)`(?!`)"), " ` "),
    (re.compile(r'(^|(?<=[\s(\[{<]))"'), " `` "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"(^|(?<=\s))[-.](?=[a-z])"), r"\g<0> "),
    (re.compile(r"(?<=[a-z0-9.'])-(?=\s|$)"), " -"),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m[0]]} "),
    (re.compile(r"\.{3,}(?=[^\s.])"), r"\g<0> "),
    (re.compile(r"-{2,}"), " -- "),
    (re.compile(r"[!?]+"), r" \g<0> "),
    (re.compile(r"[;$%&*=+\u00a5]|#(?![a-z])"), r" \g<0> "),
    (re.compile(r"[,:](?!\d)"), r" \g<0> "),
    (re.compile(r"(\d:\d+)(?=[a-z])"), r"\1 "),
    (re.compile(r"(?<=[a-z0-9])(n't|'s|'m|'re|'ve|'ll|'d)(?![a-z])"), r" \1"),
    (re.compile(r"(?<=[^'\s])'(?=\.*(?:\s|$))"), " ' "),
)
_OPEN_QUOTE = re.compile(r"^'(?=[a-z0-9])")


def ptb_tokenize(text: str) -> str:
    """``text`` as coco-caption's ``PTBTokenizer.tokenize`` returns it: newlines made spaces, lower-cased,
    PTB-tokenized, the tokens in :data:`PUNCTUATIONS` dropped, joined by single spaces."""
    return " ".join(t for t in ptb_tokens(text) if t not in PUNCTUATIONS)


def ptb_tokens(text: str) -> list[str]:
    """The PTB tokens of ``text`` (one line, lower case), punctuation included."""
    s = text.replace("\n", " ").lower().translate(_UNICODE)
    for pattern, repl in _SUBSTITUTIONS:
        s = pattern.sub(repl, s)
    words = [w for raw in s.split() for w in _open_quote(raw)]
    out: list[str] = []
    for i, w in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        out.extend(_split_period(w, after))
    return [t for w in out for t in _SPLIT_WORDS.get(w, w).split()]


def _open_quote(w: str) -> list[str]:
    """A whitespace-separated chunk with an opening single quote split off (as `)."""
    if (
        w.rstrip(".") in _KEPT_QUOTE_WORDS
        or w in _SPLIT_WORDS
        or not _OPEN_QUOTE.match(w)
        or re.fullmatch(r"'\d+s", w)
    ):
        return [w]
    return ["`", w[1:]]


def _split_period(w: str, after: str) -> list[str]:
    """``w`` with a final period split off unless it ends an abbreviation, an initial or an acronym."""
    stem = w.rstrip(".")
    if not stem or stem == w:
        return w.split()
    dots = len(w) - len(stem)
    if _abbreviation(stem, after if dots == 1 else ""):
        return [f"{stem}.", *["."] * (dots - 1)]
    return [stem, *["."] * dots]


def _abbreviation(stem: str, after: str) -> bool:
    """Whether ``stem`` + "." is one token: a letter, an acronym (``a.m``, ``u.s``), a listed abbreviation, or
    ``no`` before a number."""
    if re.fullmatch(r"[a-z]", stem) or re.fullmatch(r"[a-z](\.[a-z])+", stem):
        return True
    return stem in _ABBREVIATIONS or (stem == "no" and after[:1].isdigit())


# ----------------------------------------------------------------------------------------------------------------
# reading


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForgetlessError(
            f"cannot read the caption annotations ({e})",
            file=path,
            remedy="use the file as published, unchanged",
        ) from None


def _bad(path: Path, what: str) -> ForgetlessError:
    return ForgetlessError(
        f"the caption annotations are not in the published layout: {what}",
        file=path,
        remedy="use the file as published, unchanged",
    )


def _item(unit: str, image: Path, prompt: str, references: list[str]) -> Item:
    return Item(
        id=unit,
        image=image,
        turns=[("user", prompt), ("assistant", references[0])],
        unit=unit,
        meta={"references": references},
    )


def read_karpathy(folder: Path, name: str, image_dirs: Sequence[str], prompt: str) -> list[Item]:
    """The ``test`` images of the Karpathy split file ``name``: one item per image, its ``sentences[].raw`` the
    references; the image at ``<filepath>/<filename>`` where the record has a ``filepath``, else in the first of
    ``image_dirs`` that exists."""
    _need_scorer()
    path = need_file(folder, name, f"annotations/{name}")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _bad(path, "no 'images' list")
    default = next((folder / d for d in image_dirs if (folder / d).is_dir()), folder / image_dirs[0])
    items = []
    for k, img in enumerate(data["images"]):
        try:
            if img["split"] != "test":
                continue
            refs = [s["raw"] for s in img["sentences"]]
            where = folder / img["filepath"] if "filepath" in img else default
            unit = str(img.get("cocoid", Path(img["filename"]).stem))
            image = where / img["filename"]
        except (KeyError, TypeError) as e:
            raise _bad(path, f"image record {k} lacks {e}") from None
        if not refs:
            raise _bad(path, f"image {unit} has no sentences")
        items.append(_item(unit, image.resolve(), prompt, refs))
    return _unique(items, path)


def read_coco(folder: Path, year: str) -> list[Item]:
    """COCO's ``captions_val<year>.json`` (``images`` and ``annotations`` with ``image_id`` / ``caption``): one
    item per image in the file's order, its captions in annotation order; the images in ``val<year>/``."""
    _need_scorer()
    name = f"captions_val{year}.json"
    path = need_file(folder, f"annotations/{name}", name)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _bad(path, "no 'images' list")
    refs: dict[Any, list[str]] = {}
    try:
        for a in data["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        images = [(img["id"], img["file_name"]) for img in data["images"]]
    except (KeyError, TypeError) as e:
        raise _bad(path, f"a record lacks {e}") from None
    where = (folder / f"val{year}").resolve()
    items = []
    for image_id, file_name in images:
        if image_id not in refs:
            raise _bad(path, f"image {image_id} has no caption")
        items.append(_item(str(image_id), where / file_name, CAPTION_PROMPT, refs[image_id]))
    return _unique(items, path)


def _unique(items: list[Item], path: Path) -> list[Item]:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise _bad(path, f"image {it.id} is listed twice")
        seen.add(it.id)
    return items


def _need_scorer() -> None:
    """pycocoevalcap importable, checked before any model work."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ForgetlessError(
            "the caption benchmarks are scored by pycocoevalcap, which is not installed",
            remedy="pip install 'forgetless[benchmarks]' (or pip install pycocoevalcap)",
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# scoring


def score_captions(items: list[Item], predictions: list[str]) -> Scored:
    """Per image its CIDEr-D (coco-caption's per-image value; their mean is the corpus CIDEr-D), and as the
    official figures coco-caption's ``CIDEr`` and ``Bleu_1`` … ``Bleu_4``. ``correct``: a positive CIDEr-D."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {it.unit: [ptb_tokenize(r) for r in it.meta["references"]] for it in items}
    res = {it.unit: [ptb_tokenize(p)] for it, p in zip(items, predictions)}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    values = [float(v) for v in per_image]
    official = {"CIDEr": float(cider), **{f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}}
    return Scored(values, [v > 0 for v in values], {**official, "images": len(values)})


def _register(name: str, description: str, read: Callable[[Path], list[Item]]) -> None:
    register(
        Benchmark(
            name,
            description,
            read,
            score_captions,
            headline="CIDEr-D ×100",
            scale=100.0,
            max_new_tokens=MAX_NEW_TOKENS,
            graded=True,
        )
    )


_register(
    "coco-karpathy",
    "COCO captions, Karpathy test split (dataset_coco.json + val2014/); CIDEr-D",
    lambda folder: read_karpathy(folder, "dataset_coco.json", ("val2014",), KARPATHY_PROMPT),
)
_register(
    "flickr30k",
    "Flickr30k captions, Karpathy test split (dataset_flickr30k.json + flickr30k-images/); CIDEr-D",
    lambda folder: read_karpathy(
        folder, "dataset_flickr30k.json", ("flickr30k-images", "images"), CAPTION_PROMPT
    ),
)
_register(
    "coco2014-val",
    "COCO captions val2014 (annotations/captions_val2014.json + val2014/); CIDEr-D",
    lambda folder: read_coco(folder, "2014"),
)
_register(
    "coco2017-val",
    "COCO captions val2017 (annotations/captions_val2017.json + val2017/); CIDEr-D",
    lambda folder: read_coco(folder, "2017"),
)
