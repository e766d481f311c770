"""The testbed's generated tasks, checked against the pixels (an independent reading of each picture), its build
helpers against brute-force loops, and the sweep/evaluation cache on a tiny model."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from forgetless.testbed import build, scenes, tasks

SIZES = {"train": 30, "val": 10, "test": 30}


def _records(folder, split):
    return [json.loads(x) for x in (folder / f"{split}.jsonl").read_text().splitlines()]


def _pixels(folder, rec):
    return np.asarray(Image.open(folder / rec["image"]).convert("RGB")).astype(int)


def _mask(img, colour):
    return np.abs(img - np.array(scenes.COLOURS[colour])).sum(-1) < 30


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name in ("colour", "count", "count_many", "spatial", "digits", "tag", "caption"):
        tasks.write_task(root, name, sizes=SIZES)
    return root


def test_colour_answers_match_the_pixels(task_root):
    for rec in _records(task_root / "colour", "test"):
        img = _pixels(task_root / "colour", rec)
        counts = {c: int(_mask(img, c).sum()) for c in scenes.COLOURS}
        assert max(counts, key=counts.get) == rec["answer"] and rec["answer"] in rec["options"]


@pytest.mark.parametrize("name", ["count", "count_many"])
def test_count_answers_match_connected_components(task_root, name):
    lo, hi = (1, 4) if name == "count" else (5, 9)
    seen = set()
    for rec in _records(task_root / name, "test"):
        img = _pixels(task_root / name, rec)
        blobs = sum(ndimage.label(_mask(img, c))[1] for c in scenes.COLOURS)
        assert blobs == int(rec["answer"]) and lo <= blobs <= hi
        seen.add(blobs)
    assert len(seen) >= 3  # the counts vary


def test_spatial_answers_match_centroids(task_root):
    for rec in _records(task_root / "spatial", "test"):
        img = _pixels(task_root / "spatial", rec)
        words = rec["question"].split()  # Where is the <c1> <k1> relative to the <c2> <k2>?
        a = np.argwhere(_mask(img, words[3])).mean(0)
        b = np.argwhere(_mask(img, words[8])).mean(0)
        dy, dx = a - b
        want = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert rec["answer"] == want


def test_splits_are_disjoint_and_generation_is_deterministic(task_root, tmp_path):
    def digests(name, split):
        folder = task_root / name
        return {
            hashlib.sha256((folder / r["image"]).read_bytes()).hexdigest() for r in _records(folder, split)
        }

    for name in ("spatial", "digits"):
        assert not digests(name, "train") & digests(name, "test")
    again = tasks.write_task(tmp_path, "spatial", sizes=SIZES)
    assert (again / "test.jsonl").read_text() == (task_root / "spatial" / "test.jsonl").read_text()
    assert digests("spatial", "test") == {
        hashlib.sha256((again / r["image"]).read_bytes()).hexdigest() for r in _records(again, "test")
    }
    # digits: the images of each split come from disjoint indices of scikit-learn's set, labels kept
    _, labels = scenes.digits()
    for split in ("train", "val"):
        assert not set(tasks._digit_indices(split, 0)) & set(tasks._digit_indices("test", 0))
    idx = tasks._digit_indices("test", 0)
    assert [r["answer"] for r in _records(task_root / "digits", "test")] == [str(labels[i]) for i in idx[:30]]


def test_tag_and_caption_list_shapes_left_to_right(task_root):
    for rec in _records(task_root / "tag", "test"):
        img = _pixels(task_root / "tag", rec)
        xs = []
        for item in rec["answer"].split():
            kind, colour = item.split(":")
            assert kind in scenes.KINDS
            xs.append(np.argwhere(_mask(img, colour))[:, 1].mean())
        assert xs == sorted(xs) and "options" not in rec
    for rec in _records(task_root / "caption", "test"):
        assert rec["answer"] in rec["options"] and len(set(rec["options"])) == 4


def test_patch_labels_and_reconstruction_target_against_loops():
    rng = random.Random(3)
    shapes = tasks.shapes_for_pretraining(rng)
    labels = build._patch_labels(shapes)
    side = scenes.SIZE // build.PATCH
    for p in range(build.N_PATCHES):
        inside = [
            s for s in shapes if int(s.y) // build.PATCH == p // side and int(s.x) // build.PATCH == p % side
        ]
        if not inside:
            assert labels[p] == 0
        else:
            s = max(inside, key=lambda s: s.r)
            want = 1 + list(scenes.COLOURS).index(s.colour) * len(scenes.KINDS) + scenes.KINDS.index(s.kind)
            assert labels[p] == want
    x = torch.randn(2, 3, scenes.SIZE, scenes.SIZE)
    got = build._recon_target(x)
    for b in range(2):
        for p in range(build.N_PATCHES):
            py, px = divmod(p, side)
            patch = x[b, :, py * 16 : (py + 1) * 16, px * 16 : (px + 1) * 16]
            want = torch.stack(
                [
                    patch[:, i * 4 : (i + 1) * 4, j * 4 : (j + 1) * 4].mean((1, 2))
                    for i in range(4)
                    for j in range(4)
                ]
            )  # [16 cells, 3]
            torch.testing.assert_close(got[b, p], want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_chat_template_renders_smollm2_chatml_without_system_prompt():
    from transformers import AutoTokenizer

    from forgetless.embedded import export_smollm2

    proc = build.processor(AutoTokenizer.from_pretrained(export_smollm2()))
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    text = proc.apply_chat_template(msgs, tokenize=False)
    assert (
        text == f"<|im_start|>user\n{build.IMAGE_TOKEN}Hi?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    )
    img = Image.new("RGB", (scenes.SIZE, scenes.SIZE))
    ids = proc(text=[text], images=[img], return_tensors="pt")["input_ids"][0]
    assert int((ids == build.IMAGE_TOKEN_ID).sum()) == build.N_PATCHES


def test_assembled_model_is_smollm2_plus_the_committed_vision_weights():
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from forgetless.embedded import export_smollm2

    committed = load_file(build.WEIGHTS_DIR / build.VISION_FILE)
    assert (build.WEIGHTS_DIR / build.VISION_FILE).stat().st_size <= 25 * 2**20
    model, proc = build.assemble(committed)
    lm = AutoModelForCausalLM.from_pretrained(export_smollm2(), dtype=torch.float32)
    ours = model.model.language_model.state_dict()
    for k, v in lm.model.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    for k, v in committed.items():
        assert torch.equal(state[k], v), k
    # a real forward with a picture: 16 image tokens replaced by projected patch features
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    img = scenes.draw([scenes.Shape("red", "circle", 32, 32, 14)])
    batch = proc(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    tok = proc.tokenizer
    colours = {c: logits[tok.encode(c)[0]].item() for c in scenes.COLOURS}
    assert max(colours, key=colours.get) == "red"  # the trained vision side is read by the language model


# ---------------------------------------------------------------------------------- the multi-task experiment's tasks
NEW = ("largest_colour", "odd_colour", "count_red", "digit_parity")


@pytest.fixture(scope="module")
def new_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_tasks")
    for name in NEW:
        tasks.write_task(
            root, name, sizes={**SIZES, "train": SIZES["train"] if tasks.TASKS[name].sizes["train"] else 0}
        )
    return root


def _blobs(img, colour):
    lab, n = ndimage.label(_mask(img, colour))
    return [np.argwhere(lab == k + 1) for k in range(n)]


def test_largest_colour_answer_is_the_widest_blob(new_root):
    # the largest shape's radius is ≥ 1.35× every other's, so its bounding box's longer side is the longest
    for rec in _records(new_root / "largest_colour", "test"):
        img = _pixels(new_root / "largest_colour", rec)
        extent = {
            c: max(int(np.ptp(b, axis=0).max()) for b in _blobs(img, c))
            for c in scenes.COLOURS
            if _mask(img, c).any()
        }
        assert (
            len(extent) == 3
            and max(extent, key=extent.get) == rec["answer"]
            and rec["answer"] in rec["options"]
        )


def test_odd_colour_answer_is_the_colour_with_one_blob(new_root):
    answers = set()
    for rec in _records(new_root / "odd_colour", "test"):
        img = _pixels(new_root / "odd_colour", rec)
        blobs = {c: len(_blobs(img, c)) for c in scenes.COLOURS}
        once = [c for c, k in blobs.items() if k == 1]
        assert once == [rec["answer"]] and 3 <= sum(blobs.values()) <= 5
        answers.add(rec["answer"])
    assert len(answers) >= 3


def test_count_red_answer_is_the_number_of_red_blobs(new_root):
    counts = set()
    for rec in _records(new_root / "count_red", "test"):
        img = _pixels(new_root / "count_red", rec)
        k = len(_blobs(img, "red"))
        assert str(k) == rec["answer"] and rec["options"] == ["1", "2", "3", "4"]
        assert sum(len(_blobs(img, c)) for c in scenes.COLOURS) > k  # never only red shapes
        counts.add(k)
    assert counts == {1, 2, 3, 4}


def test_digit_parity_is_the_digits_own_held_out_images(new_root):
    _, labels = scenes.digits()
    for split in ("val", "test"):
        idx = tasks._digit_indices(split, 0)
        want = ["odd" if labels[i] % 2 else "even" for i in idx[: SIZES[split]]]
        assert [r["answer"] for r in _records(new_root / "digit_parity", split)] == want
        assert not set(idx) & set(tasks._digit_indices("train", 0))  # never a digits training picture


def test_new_tasks_splits_and_kinds(new_root):
    for name in NEW:
        meta = json.loads((new_root / name / "task.json").read_text())
        assert meta["kind"] == "downstream" and meta["role"] == tasks.TASKS[name].kind
    for name in ("largest_colour", "odd_colour"):
        folder = new_root / name
        digests = {
            s: {hashlib.sha256((folder / r["image"]).read_bytes()).hexdigest() for r in _records(folder, s)}
            for s in tasks.SPLITS
        }
        assert not digests["train"] & digests["test"] and not digests["val"] & digests["test"]
    for name in tasks.UNSEEN:
        assert (new_root / name / "train.jsonl").read_text() == ""
    # the single-task report's downstream tasks are unchanged; the multi-task ones add to them
    assert tasks.DOWNSTREAM == ["digits", "spatial", "count_many", "tag"]
    assert tasks.SEEN == [*tasks.DOWNSTREAM, "largest_colour", "odd_colour"]
    assert tasks.UNSEEN == ["digit_parity", "count_red"] and not set(tasks.SEEN) & set(tasks.UNSEEN)
