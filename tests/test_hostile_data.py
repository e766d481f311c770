"""Damaged or hostile inputs and failures of the machine are named problems: an image decompression bomb, counts of
zero, results scored on other items, a shard shortened while it is merged, a full disk, an out-of-memory, too
little free space — one line, exit status 2, no "bug" line, no temporary folder left, the inputs as they were."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_llama_with_tokenizer, build_tiny_llama, write_qa_jsonl
from test_bad_input import digest, recipe
from test_stats_data import tiny_llava_processor

from forgetless.checkpoint import writer as W
from forgetless.checkpoint.reader import CheckpointReader, read_safetensors_header
from forgetless.cli import main
from forgetless.errors import ForgetlessError
from forgetless.stats.data import BadSample, Encoder, Sample, check_image, encode_or_skip


def refused(args: list[str], capsys) -> str:
    """Run the command line, expect exit 2 and one error line (after progress lines, if any) that is not the
    "bug" line; return it."""
    with pytest.raises(SystemExit) as e:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, lines
    assert lines[-1].startswith("error: ") and "bug" not in lines[-1], lines
    assert [x for x in lines if "error" in x] == lines[-1:], lines
    return lines[-1]


def leftovers(root: Path) -> list[Path]:
    return list(root.rglob(".*forgetless-*"))


@pytest.fixture()
def ws(tmp_path):
    base = build_tiny_llama(tmp_path / "base", seed=0)
    ft = build_tiny_llama(tmp_path / "ft", seed=1)
    rpath = tmp_path / "recipe.yaml"
    rpath.write_text(yaml.safe_dump(recipe(base, ft)))
    return tmp_path, base, ft, rpath


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama_with_tokenizer(tmp_path_factory.mktemp("hostile_llama"), tie=False)


# ------------------------------------------------------------------------------------- data
def png(path: Path, width: int, height: int) -> Path:
    """A 1-bit grey PNG, all black: a few KB on disk however many pixels it decodes to."""
    row = b"\0" + bytes((width + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    check_image(png(tmp_path / "under.png", 9000, 9000))  # 81,000,000 pixels: accepted
    with pytest.raises(
        BadSample, match=r"10000×10000 = 100,000,000 pixels, more than the limit of 89,478,485"
    ):
        check_image(
            png(tmp_path / "over.png", 10000, 10000)
        )  # Pillow itself only warns below twice the limit
    bomb = png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadSample, match=r"bomb\.png has more pixels than twice the limit of 89,478,485"):
        check_image(bomb)


def test_stats_and_finetune_refuse_a_bomb_naming_the_data_file_and_the_image(tmp_path):
    bomb = png(tmp_path / "bomb.png", 20000, 20000)
    sample = Sample(
        id="s1",
        image=bomb,
        turns=[("user", "what?"), ("assistant", "black")],
        source=tmp_path / "calib.jsonl",
        index=0,
    )
    skipped: list = []
    enc = Encoder(tiny_llava_processor())
    with pytest.raises(ForgetlessError) as e:
        encode_or_skip(enc, sample, "error", skipped)
    assert str(e.value).startswith(f"{tmp_path / 'calib.jsonl'}: sample 's1': image {bomb} has more pixels")
    assert "--on-bad-sample skip" in str(e.value)
    assert encode_or_skip(enc, sample, "skip", skipped) is None and "decompression bomb" in skipped[0][1]


def test_eval_refuses_a_bomb_before_loading_the_model(tmp_path, llama_dir, capsys, monkeypatch):
    import forgetless.cpm

    monkeypatch.setattr(forgetless.cpm, "load_model", None)  # a call would be an unexpected TypeError
    bomb = png(tmp_path / "bomb.png", 20000, 20000)
    task = tmp_path / "look.jsonl"
    task.write_text(
        json.dumps({"id": "a", "image": bomb.name, "question": "<image> colour?", "answer": "black"})
    )
    err = refused(["eval", str(llama_dir), "--tasks", str(task), "--quiet"], capsys)
    assert err.startswith(f"error: {task}: sample 'a': image {bomb} has more pixels") and "bomb" in err


def test_stats_refuses_a_bomb_before_loading_the_model(tmp_path, llama_dir, capsys, monkeypatch):
    from forgetless.stats import run

    monkeypatch.setattr(run, "load_model", None)
    bomb = png(tmp_path / "bomb.png", 20000, 20000)
    data = tmp_path / "calib.jsonl"
    data.write_text(
        json.dumps({"id": "b", "image": "bomb.png", "question": "<image> colour?", "answer": "black"})
    )
    err = refused(
        ["stats", "gram", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "g.safetensors")],
        capsys,
    )
    assert err.startswith(f"error: {data}: sample 'b': image {bomb} has more pixels than twice the limit")
    assert err.endswith("— fix the sample or pass --on-bad-sample skip")


COUNTS = [
    ["eval", "M", "--tasks", "t", "--batch-size", "0"],
    ["eval", "M", "--tasks", "t", "--max-new-tokens", "0"],
    ["eval", "M", "--tasks", "t", "--limit", "-1"],
    ["stats", "fisher", "M", "--data", "d", "-n", "0"],
    ["stats", "gram", "M", "--data", "d", "--batch-size", "-2"],
    ["stats", "gram", "M", "--data", "d", "--max-length", "0"],
    ["finetune", "M", "--data", "d", "--out", "o", "--batch-size", "0"],
    ["finetune", "M", "--data", "d", "--out", "o", "--steps", "0"],
    ["finetune", "M", "--data", "d", "--out", "o", "--grad-accum", "0"],
    ["finetune", "M", "--data", "d", "--out", "o", "--lora-r", "0"],
    ["finetune", "M", "--data", "d", "--out", "o", "--warmup", "-1"],
    ["cgm", "B", "F", "--general-data", "g", "--task-data", "t", "--out", "o", "-n", "0"],
    ["continual", "add", "S", "--adapter", "a", "-n", "0"],
    ["continual", "add", "S", "--adapter", "a", "--rank", "0"],
    ["sweep", "r.yaml", "--param", "alpha=1", "--tasks", "t", "--general", "g", "--batch-size", "0"],
]


@pytest.mark.parametrize("args", COUNTS, ids=[" ".join(a[:2] + a[-2:]) for a in COUNTS])
def test_counts_of_zero_or_less_are_refused_before_any_work(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # nothing named exists: the option is refused before any file is looked at
    err = refused(args, capsys)
    assert f"Invalid value for '{args[-2]}': {args[-1]} is not in the range" in err
    assert f"see 'forgetless {' '.join(a for a in args[:2] if a.islower() and a.isalpha())}" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [[], ["stats"]], ids=["forgetless", "forgetless stats"])
def test_a_bare_command_group_still_prints_its_help(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"Usage: {' '.join(['forgetless', *args])} [OPTIONS] COMMAND")
    assert "Commands:" in err and "error" not in err


def test_eval_refuses_a_base_result_scored_on_other_items(tmp_path, llama_dir, capsys, monkeypatch):
    import forgetless.cpm

    def quiz(folder: str, questions: list[str]) -> Path:
        path = tmp_path / folder / "quiz.jsonl"
        path.parent.mkdir()
        path.write_text(
            "".join(
                json.dumps({"question": q, "answer": "yes", "options": ["yes", "no"]}) + "\n"
                for q in questions
            )
        )
        return path

    ours, other = quiz("ours", ["Is it red?", "Is it big?"]), quiz("other", ["Is it red?", "Is it old?"])
    base = tmp_path / "base.json"
    main(["eval", str(llama_dir), "--tasks", str(ours), "--out", str(base), "--quiet"])
    capsys.readouterr()
    fps = json.loads(base.read_text())["tasks"]["quiz"]["item_fingerprints"]
    assert len(fps) == 2 and all(len(f) == 12 for f in fps)

    load = forgetless.cpm.load_model
    monkeypatch.setattr(forgetless.cpm, "load_model", None)  # refused before the model is loaded
    err = refused(["eval", str(llama_dir), "--tasks", str(other), "--base", str(base), "--quiet"], capsys)
    assert err == (
        f"error: {base}: task 'quiz' was scored on other items than the base model's (item 1 differs: "
        "another file, split or version of a task with the same name) — evaluate every model on the "
        "same task files"
    )
    monkeypatch.setattr(forgetless.cpm, "load_model", load)
    main(
        ["eval", str(llama_dir), "--tasks", str(ours), "--base", str(base), "--quiet"]
    )  # the same items: fine
    assert "note:" not in capsys.readouterr().out
    # a result written before fingerprints were recorded: compared by name and size, and the user is told
    old = json.loads(base.read_text())
    del old["tasks"]["quiz"]["item_fingerprints"]
    base.write_text(json.dumps(old))
    main(["eval", str(llama_dir), "--tasks", str(other), "--base", str(base), "--quiet"])
    assert f"note: {base} has no item fingerprints for quiz" in capsys.readouterr().out


def test_quiet_silences_the_loading_bars_of_transformers(tmp_path, llama_dir, capsys):
    from transformers.utils import logging as hf_logging

    task = write_qa_jsonl(tmp_path / "qa.jsonl", [("Say yes.", "yes")])
    args = ["eval", str(llama_dir), "--tasks", str(task)]
    hf_logging.enable_progress_bar()  # the test session turns them off (conftest.py); a user's run has them
    try:
        main(args)
        assert "Loading weights" in capsys.readouterr().err  # what --quiet has to silence
        main([*args, "--quiet"])
        assert capsys.readouterr().err == ""
        assert hf_logging.is_progress_bar_enabled()  # and only for that run
    finally:
        hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------- a shard shortened mid-merge
def test_a_shard_shortened_while_it_is_merged_is_named(ws, capsys, monkeypatch):
    root, _, ft, rpath = ws
    shard = ft / "model.safetensors"
    _, data_start = read_safetensors_header(shard)
    view = CheckpointReader.view

    def shortened_first(
        self, name, rows=None
    ):  # another process cuts the shard after the plan, before a read
        if self.path == ft:
            os.truncate(shard, data_start)
        return view(self, name, rows)

    monkeypatch.setattr(CheckpointReader, "view", shortened_first)
    err = refused(["merge", str(rpath), "--out", str(root / "out"), "--quiet"], capsys)
    assert err.startswith(f"error: {shard}: tensor ") and "file is truncated while reading" in err
    assert not (root / "out").exists() and not leftovers(root)


SHORTEN_AFTER_MAPPING = """
import mmap, os, sys
from forgetless.checkpoint import reader
from forgetless.cli import main

class Mmap:  # the mmap module, except that the shard is shortened right after it is mapped
    def __getattr__(self, name):
        return getattr(mmap, name)

    def mmap(self, *args, **kw):
        m = mmap.mmap(*args, **kw)
        os.truncate(sys.argv[1], 0)
        return m

reader.mmap = Mmap()
main(sys.argv[2:])
"""


def test_a_shard_shortened_after_it_is_mapped_exits_2_not_sigbus(ws):
    root, _, ft, rpath = ws
    shard = ft / "model.safetensors"
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SHORTEN_AFTER_MAPPING),
            str(shard),
            "merge",
            str(rpath),
            "--out",
            str(root / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err)  # not -7 (SIGBUS: exit status 135 in a shell)
    assert err.startswith(f"error: {shard}: tensor ") and "truncated" in err and "\n" not in err
    assert not (root / "out").exists() and not leftovers(root)


# ------------------------------------------------------------------------------------- operating-system errors
@pytest.mark.parametrize(
    "call, succeeding",
    [("pwrite", 0), ("pwrite", 1), ("fdatasync", 0), ("fsync", 0)],
    ids=["header", "tensor", "background-sync", "final-sync"],
)
def test_a_full_disk_names_the_file_being_written(ws, capsys, monkeypatch, call, succeeding):
    root, base, ft, rpath = ws
    before = {d: digest(d) for d in (base, ft)}
    real, calls = getattr(os, call), []

    def full(
        *a, **k
    ):  # the first `succeeding` calls go through (the header: one pwrite), then the disk is full
        calls.append(a)
        if len(calls) <= succeeding:
            return real(*a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the system calls raise it: no file name

    monkeypatch.setattr(W.os, call, full)
    err = refused(["merge", str(rpath), "--out", str(root / "out"), "--quiet"], capsys)
    assert err == (
        f"error: {root / 'out' / 'model.safetensors'}: No space left on device — free space on that "
        "disk, or write the output to another disk"
    )
    assert not (root / "out").exists() and not leftovers(root)
    assert {d: digest(d) for d in (base, ft)} == before


def stats_args(model: Path, root: Path) -> list[str]:
    data = write_qa_jsonl(root / "calib.jsonl", [("Say yes.", "yes"), ("Say no.", "no")])
    return [
        "stats",
        "gram",
        str(model),
        "--data",
        str(data),
        "--out",
        str(root / "gram.safetensors"),
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]


def test_a_full_disk_while_the_statistics_are_saved_names_the_file(tmp_path, llama_dir, capsys, monkeypatch):
    from forgetless.stats import store

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "save_file", full)
    err = refused(stats_args(llama_dir, tmp_path), capsys)
    assert err.startswith(f"error: {tmp_path / 'gram.safetensors'}: No space left on device — free space")
    assert not (tmp_path / "gram.safetensors").exists() and not list(tmp_path.glob(".gram*"))


def test_a_full_disk_while_a_result_is_written_names_the_file(tmp_path, monkeypatch):
    import io

    from forgetless.eval import report

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_file(fd, mode):
        os.close(fd)
        return Full()

    monkeypatch.setattr(report.os, "fdopen", full_file)
    with pytest.raises(OSError) as e:
        report.write_json(tmp_path / "result.json", {"tasks": {}})
    assert e.value.filename == str(tmp_path / "result.json") and e.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- out of memory
OOM = [
    ("merge", MemoryError(), "out of memory in `forgetless merge` — lower --memory"),
    (
        "eval",
        torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
            "of 79.11 GiB of which 1.20 GiB is free."
        ),
        (
            "out of GPU memory in `forgetless eval`: 2.00 GiB could not be allocated — lower --batch-size or --dtype "
            "bfloat16"
        ),
    ),
    (
        "stats",
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 40000000000000 bytes. Error code 12"
        ),
        "out of memory in `forgetless stats`: 36.38 TiB could not be allocated — lower --batch-size, --max-length",
    ),
]


@pytest.mark.parametrize("command, error, words", OOM, ids=[c for c, _, _ in OOM])
def test_out_of_memory_is_one_line_saying_what_to_lower(ws, capsys, monkeypatch, command, error, words):
    from forgetless.engine import run as engine
    from forgetless.eval import report
    from forgetless.stats import run

    root, base, _, rpath = ws

    def short(*a, **k):
        raise error

    target, args = {
        "merge": (engine, ["merge", str(rpath), "--out", str(root / "out"), "--quiet"]),
        "eval": (report, ["eval", str(base), "--tasks", "t"]),
        "stats": (run, ["stats", "gram", str(base), "--data", "d", "--out", str(root / "g.safetensors")]),
    }[command]
    monkeypatch.setattr(
        target, {"merge": "execute", "eval": "run_eval", "stats": "compute_statistics"}[command], short
    )
    err = refused(args, capsys)
    assert err.startswith(f"error: {words}"), err
    assert not leftovers(root)


# ------------------------------------------------------------------------------------- free space
def test_a_merge_too_large_for_the_free_space_is_refused_before_any_work(ws, capsys, monkeypatch):
    root, base, _, rpath = ws
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with CheckpointReader(base) as r:
        size = sum(r.info(n).nbytes for n in r.names())
    err = refused(["merge", str(rpath), "--out", str(root / "out"), "--quiet"], capsys)
    assert err == (
        f"error: {root / 'out'}: the output needs {W.human_bytes(size)} but its disk has 1000 B free — "
        "free space on that disk, or write the output to another disk"
    )
    assert not (root / "out").exists() and not leftovers(root)


def test_statistics_too_large_for_the_free_space_are_refused_before_the_pass(
    tmp_path, llama_dir, capsys, monkeypatch
):
    from forgetless.stats import run

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(run, "accumulate_gram", None)  # the pass over the data is not started
    cfg = json.loads((llama_dir / "config.json").read_text())
    # one Gram per distinct input: q/k/v, o, gate/up (hidden wide) and down (intermediate wide), and lm_head's
    linears = (
        cfg["num_hidden_layers"] * (3 * cfg["hidden_size"] ** 2 + cfg["intermediate_size"] ** 2)
        + cfg["hidden_size"] ** 2
    )
    err = refused(stats_args(llama_dir, tmp_path), capsys)
    assert err == (
        f"error: {tmp_path / 'gram.safetensors'}: the gram file needs {W.human_bytes(4 * linears)} but "
        "its disk has 1000 B free — free space on that disk, or write the output to another disk"
    )


def test_check_free_space_looks_at_the_nearest_existing_folder(tmp_path, monkeypatch):
    from forgetless.checkpoint.space import check_free_space

    seen = []
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: seen.append(Path(p)) or shutil._ntuple_diskusage(10, 5, 5)
    )
    check_free_space(tmp_path / "a" / "b" / "out", 5, "the output")
    assert seen == [tmp_path]
    with pytest.raises(ForgetlessError, match="the output needs 6 B but its disk has 5 B free"):
        check_free_space(tmp_path / "a" / "b" / "out", 6, "the output")


def test_a_full_finetune_too_large_for_the_free_space_is_refused_before_training(
    tmp_path, llama_dir, capsys, monkeypatch
):
    from forgetless.train import loop

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(loop, "load_model", None)  # the model is never loaded
    data = write_qa_jsonl(tmp_path / "train.jsonl", [("Say yes.", "yes"), ("Say no.", "no")])
    with CheckpointReader(llama_dir) as r:
        size = sum(r.info(n).nbytes for n in r.names())
    err = refused(
        [
            "finetune",
            str(llama_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ft"),
            "--steps",
            "1",
            "--no-tensorboard",
        ],
        capsys,
    )
    assert err == (
        f"error: {tmp_path / 'ft'}: the fine-tuned model needs {W.human_bytes(size)} but its disk has "
        "1000 B free — free space on that disk, or write the output to another disk"
    )
