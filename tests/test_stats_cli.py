"""`forgetless stats` end to end on a tiny Llama with the SmolLM2 tokenizer: the file's values against a plain
batch-size-1 autograd loop, its metadata, torchrun with 2 processes, and the merge engine accepting the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_llama_with_tokenizer, write_qa_jsonl
from safetensors import safe_open
from transformers import LlamaForCausalLM

import forgetless
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.cli import main
from forgetless.stats.data import Encoder, load_samples

QA = [
    ("What is the capital of France?", "Paris."),
    ("2 + 3 =", "5"),
    ("Colour of the sky?", "Blue, mostly."),
    ("Opposite of hot?", "Cold"),
    ("Largest planet?", "Jupiter is the largest planet."),
    ("H2O is?", "Water"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("statscli")
    model = build_llama_with_tokenizer(root / "model", layers=3, tie=True)
    return root, model, write_qa_jsonl(root / "calib.jsonl", QA)


def bs1_fisher(model_dir: Path, data: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The definition, one sample at a time: F = mean over samples of (∇ mean answer-token CE)²."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    params = dict(model.named_parameters())
    enc = Encoder(model_dir)
    out = {n: torch.zeros_like(params[n]) for n in names}
    samples = load_samples(data, n=len(QA), seed=0)
    for s in samples:
        e = enc(s)
        logits = model(input_ids=e["input_ids"][None]).logits[0, :-1]
        labels = e["labels"][1:]
        loss = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            out[n] += g**2 / len(samples)
    return out


def test_fisher_file_equals_the_definition(tiny, capsys):
    root, model, data = tiny
    out = root / "fisher.safetensors"
    main(
        [
            "stats",
            "fisher",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--scope",
            "language.layers[1:3]",
            "-n",
            "6",
            "--batch-size",
            "4",
            "--force",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    want = bs1_fisher(model, data, names)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(
            n
            for n in CheckpointReader(model).names()
            if ".layers.1." in n or ".layers.2." in n
            if n.endswith("proj.weight")
        )
        for n in names:
            got = f.get_tensor(n)
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, want[n], rtol=1e-5, atol=1e-12)
    assert meta["kind"] == "fisher" and meta["num_samples"] == "6"
    assert meta["model_fingerprint"] == CheckpointReader(model).fingerprint()
    assert len(meta["data_fingerprint"]) == 16


def test_torchrun_two_processes_give_the_single_process_file(tiny):
    root, model, data = tiny
    single, double = root / "f1.safetensors", root / "f2.safetensors"
    args = [
        "stats",
        "fisher",
        str(model),
        "--data",
        str(data),
        "--scope",
        "language.layers[2]",
        "-n",
        "6",
        "--batch-size",
        "2",
        "--force",
    ]
    main([*args, "--out", str(single)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "forgetless.cli",
            *args,
            "--out",
            str(double),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    with safe_open(str(single), "pt") as a, safe_open(str(double), "pt") as b:
        assert a.keys() == b.keys() and b.metadata()["num_samples"] == "6"
        for k in a.keys():  # noqa: SIM118  (safe_open is not iterable)
            # the shards pad and batch other samples together, so float32 gradients differ by a few ulp (squared: ~10)
            torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k), rtol=1e-5, atol=0)


def test_the_engine_merges_with_the_file(tiny, tmp_path):
    root, model, data = tiny
    fisher = root / "fisher_all.safetensors"
    main(["stats", "fisher", str(model), "--data", str(data), "--out", str(fisher), "-n", "6", "--force"])
    other = tmp_path / "ft"
    m = LlamaForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    m.save_pretrained(other)
    recipe = {
        "method": "fisher",
        "base": str(model),
        "models": [
            {"model": str(model), "statistics": {"fisher": str(fisher)}},
            {"model": str(other), "statistics": {"fisher": str(fisher)}},
        ],
        "scope": {"no_statistics": "base"},
    }
    report = forgetless.merge(recipe, out=tmp_path / "merged", progress=False)
    # same Fisher for both models: the Fisher-weighted mean is the plain mean where F > 0
    assert report.routes["method"][0] == len(CheckpointReader(fisher).names())


def test_gram_file_counts_tokens_and_feeds_regmean(tiny, tmp_path):
    _, model, data = tiny
    out = tmp_path / "gram.safetensors"
    main(
        [
            "stats",
            "gram",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--scope",
            "language.layers[0]",
            "-n",
            "6",
            "--batch-size",
            "4",
        ]
    )
    enc = Encoder(model)
    tokens = sum(int(enc(s)["input_ids"].numel()) for s in load_samples(data, n=6, seed=0))
    net = LlamaForCausalLM.from_pretrained(model).eval()
    captured = []
    hook = net.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0][0]))
    with torch.no_grad():
        for s in load_samples(data, n=6, seed=0):
            net(input_ids=enc(s)["input_ids"][None])
    hook.remove()
    x = torch.cat(captured).double()
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["kind"] == "gram" and meta["num_samples"] == "6"
        assert json.loads(meta["token_counts"])[name] == tokens == x.shape[0]
        torch.testing.assert_close(f.get_tensor(name).double(), x.T @ x, rtol=1e-5, atol=1e-6)
    r = {
        "method": "regmean",
        "base": str(model),
        "models": [{"model": str(model), "statistics": {"gram": str(out)}}] * 2,
    }
    report = forgetless.merge(r, out=tmp_path / "merged", progress=False)
    # the 7 Linear weights of layer 0 by their Gram, every other tensor by RegMean's fallback (the average)
    assert report.routes["method"][0] == 7
    assert report.routes["method (no stats)"][0] == len(CheckpointReader(model).names()) - 7
