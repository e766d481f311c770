"""--min-pixels / --max-pixels: a Qwen2.5-VL processor's image bounds, set per run without changing the processor
given; an image gets the tokens the bounds allow, and a processor without dynamic resolution refuses them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_finetune import qwen_processor_and_model

from forgetless.errors import ForgetlessError
from forgetless.stats.data import Encoder, Sample


def image_tokens(enc: Encoder, path) -> int:
    sample = Sample("s", path, [("user", "What is it?"), ("assistant", "A square.")])
    ids = enc(sample)["input_ids"]
    pad = enc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((ids == pad).sum())


def test_pixel_bounds_set_the_image_tokens_and_leave_the_processor(tmp_path):
    proc, _ = qwen_processor_and_model()  # patch 4, merge 2: one token per 8 × 8 pixels; bounds [64, 1024]
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(path)
    before = dict(proc.image_processor.size)
    assert image_tokens(Encoder(proc), path) == 1024 // 64  # 64 × 64 = 4096 pixels, resized down to 1024
    assert image_tokens(Encoder(proc, max_pixels=256), path) == 256 // 64
    assert image_tokens(Encoder(proc, max_pixels=4096), path) == 4096 // 64  # the image as it is
    assert dict(proc.image_processor.size) == before
    with pytest.raises(ForgetlessError, match="empty"):
        Encoder(proc, min_pixels=512, max_pixels=256)


def test_pixel_bounds_are_refused_without_dynamic_resolution(tmp_path):
    from conftest import build_llama_with_tokenizer

    model = build_llama_with_tokenizer(tmp_path / "llama", layers=1)
    with pytest.raises(ForgetlessError, match="dynamic-resolution"):
        Encoder(model, max_pixels=256)


def test_stats_finetune_and_eval_pass_the_bounds_to_their_encoder(tmp_path, capsys):
    """Each command takes --max-pixels to its Encoder: on a model without dynamic resolution each refuses it in
    one line, before the model is loaded."""
    from conftest import build_llama_with_tokenizer, write_qa_jsonl
    from test_hostile_data import refused

    model = build_llama_with_tokenizer(tmp_path / "llama", layers=1)
    data = write_qa_jsonl(tmp_path / "qa.jsonl", [("2 + 2 =", "4")])
    for args in (
        ["stats", "gram", str(model), "--data", str(data), "--out", str(tmp_path / "g.safetensors")],
        ["finetune", str(model), "--data", str(data), "--out", str(tmp_path / "ft"), "--steps", "1"],
        ["eval", str(model), "--tasks", str(data), "--out", str(tmp_path / "r.json")],
    ):
        line = refused([*args, "--max-pixels", "256"], capsys)
        assert "dynamic-resolution image processor" in line, (args, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "qa.jsonl"]


def test_a_statistics_file_is_reused_only_under_the_same_image_bounds(tmp_path, capsys):
    """cgm and continual add pass the bounds to their statistics; a file taken under other bounds is not reused."""
    from conftest import build_llama_with_tokenizer, write_qa_jsonl
    from test_hostile_data import refused

    from forgetless.chains.steps import reusable
    from forgetless.stats.run import compute_statistics

    model = build_llama_with_tokenizer(tmp_path / "llama", layers=1)
    data = write_qa_jsonl(tmp_path / "qa.jsonl", [("2 + 2 =", "4")])
    out = tmp_path / "f.safetensors"
    compute_statistics(
        "fisher", model, data, out, scope=["language.layers"], device="cpu", log=None, progress=False
    )
    assert reusable("fisher", out, model, data, None, None, 0, ["language.layers"])
    assert not reusable("fisher", out, model, data, None, None, 0, ["language.layers"], pixels=(None, 256))
    line = refused(
        [
            "cgm",
            str(model),
            str(model),
            "--general-data",
            str(data),
            "--task-data",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "-n",
            "1",
            "--max-pixels",
            "256",
        ],
        capsys,
    )
    assert "dynamic-resolution image processor" in line
