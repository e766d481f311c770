"""Inputs are never overwritten, by any command (checkpoint/guard.check_output): an output that is an input, lies
inside an input folder or contains one is refused before any work, with or without --force, symlinks and hard links
seen through; an existing output needs --force (eval included)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from test_continual import tasks  # noqa: F401  (the fixture)
from test_finetune import llama_dir, text_data  # noqa: F401  (fixtures)

from forgetless.checkpoint.guard import check_output, overlap
from forgetless.cli import main
from forgetless.errors import ForgetlessError


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def ws(tmp_path, llama_dir, text_data):
    """PARENT holding a model folder and its data, as a user keeps them."""
    parent = tmp_path / "parent"
    shutil.copytree(llama_dir, parent / "model")
    shutil.copy(text_data, parent / "data.jsonl")
    return parent


def refused(capsys, root: Path, argv: list[str], words: str) -> str:
    before = digest(root)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and words in err, err
    assert digest(root) == before  # every input, byte for byte
    assert not [p for p in root.rglob(".*forgetless-*")]
    return err


def test_overlap_both_directions_through_symlinks_and_hard_links(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "model", tmp_path / "alias")
    os.link(tmp_path / "data.jsonl", tmp_path / "hard.jsonl")
    assert overlap(tmp_path / "model", tmp_path / "model") == "is"
    assert overlap(tmp_path / "alias", tmp_path / "model") == "is"
    assert overlap(tmp_path / "alias" / "x", tmp_path / "model") == "lies inside"
    assert overlap(tmp_path, tmp_path / "alias") == "contains"
    assert overlap(tmp_path / "hard.jsonl", tmp_path / "data.jsonl") == "is"
    assert overlap(tmp_path / "model2", tmp_path / "model") is None
    with pytest.raises(ForgetlessError, match="already exists"):
        check_output(tmp_path / "data.jsonl", [], force=False)
    assert check_output(tmp_path / "data.jsonl", [None], force=True) == tmp_path / "data.jsonl"


FINETUNE = [
    "finetune",
    "{p}/model",
    "--data",
    "{p}/data.jsonl",
    "--steps",
    "1",
    "--no-tensorboard",
    "--force",
]
CASES = [
    ("finetune --out PARENT", [*FINETUNE, "--out", "{p}"], "--out contains an input"),
    ("finetune --out MODEL", [*FINETUNE, "--out", "{p}/model"], "--out is an input"),
    ("finetune --out a symlink to MODEL", [*FINETUNE, "--out", "{p}/../alias"], "--out is an input"),
    (
        "finetune --optimizer-fisher MODEL/model.safetensors",
        [*FINETUNE, "--out", "{p}/../ft", "--optimizer-fisher", "{p}/model/model.safetensors"],
        "--optimizer-fisher lies inside an input",
    ),
    (
        "finetune --optimizer-fisher DATA",
        [*FINETUNE, "--out", "{p}/../ft", "--optimizer-fisher", "{p}/data.jsonl"],
        "--optimizer-fisher is an input",
    ),
    (
        "finetune --optimizer-fisher a hard link of DATA",
        [*FINETUNE, "--out", "{p}/../ft", "--optimizer-fisher", "{p}/../hard.jsonl"],
        "--optimizer-fisher is an input",
    ),
    (
        "stats --out MODEL/model.safetensors",
        [
            "stats",
            "fisher",
            "{p}/model",
            "--data",
            "{p}/data.jsonl",
            "--out",
            "{p}/model/model.safetensors",
            "--force",
        ],
        "--out lies inside an input",
    ),
    (
        "eval --out MODEL/config.json",
        ["eval", "{p}/model", "--tasks", "{p}/data.jsonl", "--out", "{p}/model/config.json", "--force"],
        "--out lies inside an input",
    ),
    (
        "eval --out TASK.jsonl",
        ["eval", "{p}/model", "--tasks", "{p}/data.jsonl", "--out", "{p}/data.jsonl", "--force"],
        "--out is an input",
    ),
    (
        "eval --out an existing file",
        ["eval", "{p}/model", "--tasks", "{p}/data.jsonl", "--out", "{p}/../old.json"],
        "--out already exists",
    ),
    (
        "cgm --out PARENT",
        [
            "cgm",
            "{p}/model",
            "{p}/model",
            "--general-data",
            "{p}/data.jsonl",
            "--task-data",
            "{p}/data.jsonl",
            "--out",
            "{p}",
            "--force",
        ],
        "--out contains an input",
    ),
]


@pytest.mark.parametrize("argv, words", [(a, w) for _, a, w in CASES], ids=[n for n, _, _ in CASES])
def test_no_command_writes_over_an_input(ws, capsys, argv, words):
    root = ws.parent
    os.symlink(ws / "model", root / "alias")
    os.link(ws / "data.jsonl", root / "hard.jsonl")
    (root / "old.json").write_text('{"mine": 1}\n')
    refused(capsys, root, [a.format(p=ws) for a in argv], words)


@pytest.mark.parametrize("where", ["adapter", "parent of the adapter", "base"])
def test_continual_add_never_writes_over_its_adapter(tasks, tiny_llava_dir, tmp_path, capsys, where):
    adapter, gram, base = (
        tmp_path / "in" / "adapter",
        tmp_path / "in" / "gram.safetensors",
        tmp_path / "in" / "base",
    )
    shutil.copytree(tasks[0][0], adapter)
    shutil.copy(tasks[0][1], gram)
    shutil.copytree(tiny_llava_dir, base)
    out = {"adapter": adapter, "parent of the adapter": adapter.parent, "base": base}[where]
    argv = [
        "continual",
        "add",
        str(tmp_path / "state"),
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--gram",
        str(gram),
        "--out",
        str(out),
        "--force",
    ]
    refused(capsys, tmp_path / "in", argv, "an input")
    assert not (tmp_path / "state").exists()
