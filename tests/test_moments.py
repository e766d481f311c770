"""The optimizer's squared gradients as a task Fisher (:mod:`forgetless.train.moments`): AdamW's bias-corrected
second moments against the recursion written out here over the clipped gradients the loop applied, the stored file
(B·v̂, its metadata, the fine-tune's fingerprint) and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llama_with_tokenizer, write_qa_jsonl
from test_finetune import QA

from forgetless.errors import ForgetlessError
from forgetless.stats.store import load_statistics, model_fingerprints
from forgetless.train import LoraSpec, StepInfo, finetune
from forgetless.train.moments import OptimizerFisher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama_with_tokenizer(tmp_path_factory.mktemp("llama"), layers=2, tie=False)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_qa_jsonl(tmp_path_factory.mktemp("text") / "train.jsonl", QA)


def test_second_moments_are_adams_average_of_the_clipped_squared_gradients(tmp_path, llama_dir, text_data):
    grads: list[dict[str, torch.Tensor]] = []
    fisher = OptimizerFisher()

    class Hook:
        def before_step(self, info: StepInfo) -> None:  # after clipping: what the optimizer applies
            grads.append({n: p.grad.detach().clone() for n, p in info.params.items() if p.grad is not None})

        def after_step(self, info: StepInfo) -> None:
            fisher.after_step(info)

    steps, batch, accum = 5, 2, 2
    finetune(
        llama_dir,
        text_data,
        tmp_path / "ft",
        train=["language.layers[1]"],
        steps=steps,
        batch_size=batch,
        grad_accum=accum,
        lr=1e-3,
        clip=0.05,
        hook=Hook(),
        log=None,
    )
    assert len(grads) == steps and fisher.moments is not None and set(fisher.moments) == set(grads[0])
    beta2 = 0.999
    for name, got in fisher.moments.items():
        v = torch.zeros_like(got, dtype=torch.float64)
        for g in grads:
            v = beta2 * v + (1 - beta2) * g[name].double() ** 2
        want = v / (1 - beta2**steps)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-12), name
        assert got.abs().max() > 0

    path = fisher.save(tmp_path / "optimizer_fisher.safetensors", tmp_path / "ft")
    reader, meta = load_statistics(path)
    with reader:
        for name, v in fisher.moments.items():
            assert torch.equal(reader.get(name), v * (batch * accum))
    assert meta["kind"] == "fisher" and meta["num_samples"] == steps * batch * accum
    assert meta["model_fingerprint"] == model_fingerprints(tmp_path / "ft")["model_fingerprint"]
    assert meta["extra"]["variant"] == "optimizer" and meta["extra"]["samples_per_step"] == batch * accum


def test_refusals(tmp_path, llama_dir, text_data):
    with pytest.raises(ForgetlessError, match="did not reach its last step"):
        OptimizerFisher().save(tmp_path / "f.safetensors", tmp_path)
    with pytest.raises(ForgetlessError, match="LoRA factors"):
        finetune(
            llama_dir,
            text_data,
            tmp_path / "lora",
            lora=LoraSpec(r=2),
            steps=2,
            batch_size=2,
            hook=OptimizerFisher(),
            log=None,
        )


def test_cli_writes_the_optimizer_fisher_and_refuses_lora(tmp_path, llama_dir, text_data, capsys):
    from forgetless.cli import main

    out, stats = tmp_path / "ft", tmp_path / "opt.safetensors"
    args = [
        "finetune",
        str(llama_dir),
        "--data",
        str(text_data),
        "--out",
        str(out),
        "--train",
        "language.layers[1]",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--optimizer-fisher",
        str(stats),
    ]
    main(args)
    reader, meta = load_statistics(stats)
    with reader:
        assert meta["num_samples"] == 4 and all(reader.get(n).min() >= 0 for n in reader.names())
    capsys.readouterr()
    for extra, words, folder in (
        (["--out", str(tmp_path / "again")], "--optimizer-fisher already exists", "again"),
        (
            [
                "--out",
                str(tmp_path / "lora"),
                "--lora",
                "--optimizer-fisher",
                str(tmp_path / "l.safetensors"),
            ],
            "LoRA run has none",
            "lora",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            main([*args, *extra])
        assert e.value.code != 0 and words in capsys.readouterr().err and not (tmp_path / folder).exists()


def test_testbed_optimizer_fisher_is_the_cached_fine_tunes_and_reused(tmp_path, llama_dir, text_data):
    import json
    import shutil

    from forgetless.testbed.experiment import optimizer_fisher

    task = tmp_path / "task"
    task.mkdir()
    shutil.copy(text_data, task / "train.jsonl")
    (task / "task.json").write_text(json.dumps({"name": "qa", "version": 1, "seed": 0}))
    recipe = {"train": ["language.layers[1]"], "steps": 3, "batch_size": 2, "lr": 1e-3, "seed": 0}
    finetune(llama_dir, task / "train.jsonl", tmp_path / "ft", log=None, **recipe)
    lines: list[str] = []
    path = optimizer_fisher(
        llama_dir, task, recipe, tmp_path / "ft", tmp_path / "s" / "f.safetensors", lines.append
    )
    assert json.loads(path.with_name("f.safetensors.json").read_text())["same_weights_as_finetuned"] is True
    assert any("weights equal" in x for x in lines) and not (tmp_path / "s" / ".f-finetune").exists()
    reader, meta = load_statistics(path)
    with reader:
        assert meta["num_samples"] == 3 * 2 and reader.names()
    before = path.stat().st_mtime_ns
    optimizer_fisher(llama_dir, task, recipe, tmp_path / "ft", path, lines.append)
    assert path.stat().st_mtime_ns == before and "reusing" in lines[-1]
