"""`forgetless cgm`: statistics at the right models, reused on a second run, and the merge they feed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_llama_with_tokenizer, write_qa_jsonl
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from forgetless.chains.cgm import published_scope
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.cli import main
from forgetless.methods.cgm import cgm

GENERAL = [("Capital of France?", "Paris."), ("2 + 2 =", "4"), ("Colour of grass?", "Green.")]
TASK = [("Zorb: red fox", "glim tor"), ("Zorb: blue cat", "pak vree"), ("Zorb: red cat", "pak tor")]


def make_pair(root: Path) -> Path:
    """root/base (a tiny 8-layer Llama), root/ft (it, moved by 2% noise), general and task calibration files."""
    base = build_llama_with_tokenizer(root / "base", layers=8, tie=False)
    shutil.copytree(base, root / "ft")
    model = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(root / "ft")
    write_qa_jsonl(root / "general.jsonl", GENERAL)
    write_qa_jsonl(root / "task.jsonl", TASK)
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("cgm"))


def test_published_scope_is_the_last_three_eighths_and_lm_head(pair):
    assert published_scope(pair / "base", "cgm") == ["language.layers[5:8]", "lm_head"]  # ⌈0.375·8⌉ = 3
    assert published_scope(pair / "base", "cgm_dagger") == ["language.layers[5:8]", "lm_head"]  # no projector


def test_chain_computes_at_the_right_models_merges_and_reuses(pair, capsys):
    out = pair / "merged"
    args = [
        "cgm",
        str(pair / "base"),
        str(pair / "ft"),
        "--general-data",
        str(pair / "general.jsonl"),
        "--task-data",
        str(pair / "task.jsonl"),
        "--out",
        str(out),
        "-n",
        "3",
        "--force",
    ]
    main(args)
    stats = pair / "merged-statistics"
    general, task = stats / "fisher_general.safetensors", stats / "fisher_task.safetensors"
    base_fp = CheckpointReader(pair / "base").weights_fingerprint()
    with safe_open(str(general), "pt") as g, safe_open(str(task), "pt") as t:
        assert g.metadata()["model_weights_fingerprint"] == base_fp  # general Fisher at θ₀
        assert (
            t.metadata()["model_weights_fingerprint"] == base_fp
        )  # task Fisher at θ₀ too (published default)
        fg = {k: g.get_tensor(k) for k in g.keys()}  # noqa: SIM118
        ft_ = {k: t.get_tensor(k) for k in t.keys()}  # noqa: SIM118
    assert sorted(fg) == sorted(
        n
        for n in CheckpointReader(pair / "base").names()
        if n.endswith("proj.weight") and any(f".layers.{i}." in n for i in (5, 6, 7)) or n == "lm_head.weight"
    )
    merged, b, f = (load_file(str(p / "model.safetensors")) for p in (out, pair / "base", pair / "ft"))
    for k in b:
        if k in fg:
            want = cgm(
                b[k].clone(),
                f[k].clone(),
                fisher_task=ft_[k].clone(),
                fisher_general=fg[k].clone(),
                alpha=0.2,
            )
            assert torch.equal(merged[k], want), k
            assert not torch.equal(merged[k], f[k])
        else:
            assert torch.equal(merged[k], f[k]), k  # out of scope, or a norm without Fisher: fine-tuned
    mtimes = (general.stat().st_mtime_ns, task.stat().st_mtime_ns)
    capsys.readouterr()
    main(args)
    text = capsys.readouterr().out
    assert text.count("reusing") == 2 and (general.stat().st_mtime_ns, task.stat().st_mtime_ns) == mtimes
    main([*args[:-3], "-n", "2", "--force"])  # another sample selection: recomputed
    assert general.stat().st_mtime_ns != mtimes[0]


def test_chain_task_fisher_at_the_finetuned_model_and_sampled(pair, capsys):
    out = pair / "merged-ft"
    args = [
        "cgm",
        str(pair / "base"),
        str(pair / "ft"),
        "--general-data",
        str(pair / "general.jsonl"),
        "--task-data",
        str(pair / "task.jsonl"),
        "--out",
        str(out),
        "-n",
        "3",
        "--force",
        "--task-fisher-at",
        "finetuned",
    ]
    main(args)
    task = pair / "merged-ft-statistics" / "fisher_task.safetensors"
    with safe_open(str(task), "pt") as t:
        assert (
            t.metadata()["model_weights_fingerprint"] == CheckpointReader(pair / "ft").weights_fingerprint()
        )
        empirical = {k: t.get_tensor(k) for k in t.keys()}  # noqa: SIM118
    capsys.readouterr()
    main([*args, "--task-fisher-variant", "sampled"])  # same model and data, other variant: recomputed
    text = capsys.readouterr().out
    assert text.count("reusing") == 1 and "fisher_task: sampled at" in text
    with safe_open(str(task), "pt") as t:
        assert '"variant": "sampled"' in t.metadata()["extra"]
        assert any(not torch.equal(t.get_tensor(k), v) for k, v in empirical.items())


def test_chain_under_torchrun_is_one_process_group_and_one_writer(pair, tmp_path):
    """torchrun with 2 ranks: both Fishers in one process group (created once, ended once with its threads),
    the merge on rank 0 alone; the merged model is the one process's to the Fishers' rounding."""
    import dist_worker as W

    def args(out):
        return [
            "cgm",
            str(pair / "base"),
            str(pair / "ft"),
            "--general-data",
            str(pair / "general.jsonl"),
            "--task-data",
            str(pair / "task.jsonl"),
            "--out",
            str(out),
            "-n",
            "3",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--force",
        ]

    main(args(tmp_path / "one"))
    ends = W.torchrun("cli", tmp_path / "probe", *args(tmp_path / "two"), timeout=300)
    assert ends == [0]  # one group for the whole chain
    one, two = (load_file(str(tmp_path / o / "model.safetensors")) for o in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one",
        "one-statistics",
        "probe",
        "two",
        "two-statistics",
    ]
