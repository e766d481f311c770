"""Encoded items remembered across evaluations (forgetless.eval.memo): a hit is the encoding the encoder gives,
folders that encode alike share items, and anything that changes an encoding misses."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_eval import mc_samples
from test_stats_data import save_image, tiny_llava_for, tiny_llava_processor, write_jsonl

from forgetless.eval import evaluate
from forgetless.eval.harness import ENCODED, _encode_options, _remembered_options, _with_answer
from forgetless.eval.memo import Memo, tensor_bytes
from forgetless.stats.data import Encoder

torch.set_num_threads(1)


@pytest.fixture
def llava_dirs(tmp_path) -> tuple[Path, Path]:
    """A tiny LLaVA folder and another with other weights and the same processor files (as a merge of it has)."""
    proc = tiny_llava_processor()
    model = tiny_llava_for(proc)
    a, b = tmp_path / "a", tmp_path / "b"
    model.save_pretrained(a)
    proc.save_pretrained(a)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(b)
    proc.save_pretrained(b)
    return a, b


@pytest.fixture(autouse=True)
def empty_memo():
    ENCODED.clear()
    yield
    ENCODED.clear()


def items_equal(x, y) -> bool:
    """The same tensors (values, dtypes, shapes) in the same places of two encoded items."""
    flat = [
        (x.prompt, y.prompt),
        *zip(x.answers, y.answers),
        *zip(x.tails, y.tails),
        *zip(x.full, y.full),
    ]
    for u, v in flat:
        if isinstance(u, dict):
            if u.keys() != v.keys() or not all(torch.equal(u[k], v[k]) for k in u):
                return False
        elif u.dtype != v.dtype or not torch.equal(u, v):
            return False
    return len(x.answers) == len(y.answers) and x.chars == y.chars and x.tail == y.tail


def second_model_hits(a: Path, b: Path, tasks: dict, **options) -> tuple[int, dict]:
    """Evaluate `a`, then `b` (hits counted), then `b` again with nothing remembered, which must give the same
    result (timings aside): (the hits of b's first evaluation, its result)."""

    def result(model: Path) -> dict:
        res = evaluate(model, tasks, device="cpu", batch_size=2, log=None, **options)
        return {k: v for k, v in res.items() if k not in ("seconds", "samples_per_s")}

    result(a)
    before = ENCODED.hits
    warm = result(b)
    hits = ENCODED.hits - before
    ENCODED.clear()
    assert result(b) == warm
    return hits, warm


def test_memo_keeps_the_most_recent_values_within_its_bytes():
    """Against a brute-force LRU: after every get, the same keys held, in the same order, within the bound."""
    rng = random.Random(0)
    memo = Memo(max_bytes=400)
    order: list[int] = []  # least recent first
    sizes: dict[int, int] = {}
    for _ in range(500):
        k = rng.randrange(12)
        n = rng.choice([10, 25, 50, 120])  # float32 elements: 40 to 480 bytes
        value = memo.get(k, lambda n=n: torch.zeros(n))
        if k in order:
            order.remove(k)
            order.append(k)
            assert value.numel() == sizes[k]  # a hit returns what was remembered
        else:
            sizes[k] = n
            if 4 * n <= 400:
                order.append(k)
                while sum(4 * sizes[j] for j in order) > 400:
                    order.pop(0)
        assert list(memo._values) == order
        assert memo.held == sum(4 * sizes[j] for j in order) <= 400
    assert memo.get(None, lambda: torch.ones(3)).sum() == 3 and len(memo) == len(order)  # None: never kept


def test_tensor_bytes_counts_nested_tensors():
    shared = torch.zeros(2)
    item = {
        "a": torch.zeros(3, dtype=torch.int64),
        "b": [shared, (torch.zeros(5, dtype=torch.uint8), shared)],
    }
    assert tensor_bytes(item) == 3 * 8 + 2 * 4 + 5  # the shared tensor once


def test_fingerprint_follows_what_the_encoder_is_built_from(llava_dirs, tmp_path):
    a, b = llava_dirs
    assert Encoder(a).fingerprint == Encoder(b).fingerprint  # other weights, same processor files
    assert Encoder(a, max_length=64).fingerprint != Encoder(a).fingerprint
    assert Encoder(tiny_llava_processor()).fingerprint is None  # built from an object: unknown
    c = tmp_path / "c"
    shutil.copytree(a, c)
    template = c / "chat_template.jinja"
    template.write_text("{{ 'Be brief. ' }}" + template.read_text())
    assert Encoder(c).fingerprint != Encoder(a).fingerprint


def test_an_unreadable_encoding_file_leaves_no_fingerprint(llava_dirs, monkeypatch):
    a, _ = llava_dirs
    (a / "vocab-notes.txt").write_text("not read by the tokenizer")
    read = Path.read_bytes

    def refuse_notes(path: Path) -> bytes:
        if "notes" in path.name:
            raise PermissionError(path)
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_notes)
    enc = Encoder(a)  # the encoder still loads: it does not need that file
    assert enc.fingerprint is None and _remembered_options(enc, mc_samples([None])[0], True) is not None
    assert len(ENCODED) == 0


def test_remembered_items_are_the_encoders(llava_dirs, tmp_path):
    """A hit equals a fresh encoding; another chat template or a rewritten image misses, and its item equals its
    own fresh encoding."""
    a, _ = llava_dirs
    img = save_image(tmp_path / "img" / "x.png", color=(200, 30, 30))
    samples = mc_samples([img, None, img])
    enc = Encoder(a)
    first = [_remembered_options(enc, s, True) for s in samples]
    again = [_remembered_options(Encoder(a), s, True) for s in samples]
    assert ENCODED.hits == 3 and all(x is y for x, y in zip(first, again))
    assert all(items_equal(x, _encode_options(enc, s, True)) for x, s in zip(first, samples))
    assert _remembered_options(enc, samples[0], False) is not first[0]  # without the tail: its own item
    assert all(f["pixel_values"] is first[0].prompt["pixel_values"] for f in first[0].full)  # one image copy

    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "chat_template.jinja").write_text("{{ 'Be brief. ' }}" + (c / "chat_template.jinja").read_text())
    other = Encoder(c)
    changed = _remembered_options(other, samples[1], True)
    assert items_equal(changed, _encode_options(other, samples[1], True))
    assert not torch.equal(changed.prompt["input_ids"], first[1].prompt["input_ids"])

    save_image(img, color=(10, 120, 240))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a distinct time even on coarse clocks
    redrawn = _remembered_options(enc, samples[0], True)
    assert items_equal(redrawn, _encode_options(enc, samples[0], True))
    assert not torch.equal(redrawn.prompt["pixel_values"], first[0].prompt["pixel_values"])


def test_evaluating_a_second_model_reuses_items_and_scores_the_same(llava_dirs, tmp_path):
    """evaluate() of a folder after another with the same processor files hits every item, and its result
    equals the one computed with nothing remembered."""
    a, b = llava_dirs
    img = save_image(tmp_path / "data" / "a.png")
    records = [
        {"id": s.id, "question": s.turns[0][1], "answer": s.options[0], "options": list(s.options)}
        for s in mc_samples([None, None, None])
    ]
    records[1]["image"] = img.name
    write_jsonl(tmp_path / "data" / "quiz.jsonl", records)

    hits, _ = second_model_hits(a, b, {"quiz": tmp_path / "data" / "quiz.jsonl"})
    assert hits == 3


def test_the_options_prompt_is_tokenized_once(llava_dirs, tmp_path):
    """An item's options share their prompt's tokens: K + 1 processor calls for K options (not 2K), and each
    option's inputs equal the ones it gets alone."""
    a, _ = llava_dirs
    sample = mc_samples([None, None, save_image(tmp_path / "x.png")])[2]  # four options, an image
    enc = Encoder(a)
    calls = []
    tokenize = enc._tokenize
    enc._tokenize = lambda text, image: calls.append(text) or tokenize(text, image)
    item = _encode_options(enc, sample, True)
    assert len(calls) == len(sample.options) + 1
    for option, full in zip(sample.options, item.full):
        alone = enc(_with_answer(sample, option))  # its labels: the answer only (the item's add the tail)
        assert full.keys() == alone.keys() and all(
            torch.equal(full[k], alone[k]) for k in full if k != "labels"
        )


def test_generation_prompts_are_remembered_and_answer_the_same(llava_dirs, tmp_path):
    """Open-answer items: the second folder's evaluation takes every prompt from the memo and generates what it
    generates with nothing remembered."""
    a, b = llava_dirs
    img = save_image(tmp_path / "data" / "a.png")
    records = [
        {"id": "q1", "question": "Colour?", "answer": "red", "image": img.name},
        {"id": "q2", "question": "Two plus two?", "answer": "four"},
    ]
    write_jsonl(tmp_path / "data" / "open.jsonl", records)

    hits, warm = second_model_hits(a, b, {"open": tmp_path / "data" / "open.jsonl"}, max_new_tokens=3)
    assert hits == 2 and warm["tasks"]["open"]["metric"] == "exact"
