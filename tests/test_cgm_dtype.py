"""`forgetless cgm --dtype` and `--tf32/--no-tf32`: float32 is today's chain bit for bit, bfloat16 merges close to
it, a Fisher file taken in another dtype is never reused, and the TF32 switch sets the CUDA flags for the span of a
command and puts them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_cgm_chain import make_pair

import forgetless.stats.fisher as fisher_module
from forgetless.cli import main
from forgetless.precision import tf32, tf32_state


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(1)
    return make_pair(tmp_path_factory.mktemp("cgm_dtype"))


def _cgm(root: Path, out: str, *extra: str) -> None:
    main(
        [
            "cgm",
            str(root / "base"),
            str(root / "ft"),
            "--general-data",
            str(root / "general.jsonl"),
            "--task-data",
            str(root / "task.jsonl"),
            "--out",
            str(root / out),
            "-n",
            "3",
            "--force",
            *extra,
        ]
    )


def _files(stats: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {role: load_file(str(stats / f"{role}.safetensors")) for role in ("fisher_general", "fisher_task")}


def _dtype_of(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["extra"])["dtype"]


def test_float32_is_the_chain_before_bit_for_bit(pair, monkeypatch):
    _cgm(pair, "today", "--stats-dir", str(pair / "s-today"))
    _cgm(pair, "f32", "--dtype", "float32", "--no-tf32", "--stats-dir", str(pair / "s-f32"))
    # the product the Fisher took before it followed the model's dtype
    monkeypatch.setattr(
        fisher_module, "per_sample_products", lambda g, x: torch.bmm(g.float().transpose(1, 2), x.float())
    )
    _cgm(pair, "before", "--stats-dir", str(pair / "s-before"))
    today, f32, before = (_files(pair / s) for s in ("s-today", "s-f32", "s-before"))
    for role in today:
        for k, v in before[role].items():
            assert torch.equal(today[role][k], v) and torch.equal(f32[role][k], v), (role, k)
    merged = [load_file(str(pair / o / "model.safetensors")) for o in ("today", "f32", "before")]
    for k, v in merged[2].items():
        assert torch.equal(merged[0][k], v) and torch.equal(merged[1][k], v), k


def test_bfloat16_merges_close_to_float32_and_never_reuses_a_float32_fisher(pair, capsys):
    stats = pair / "s-shared"
    _cgm(pair, "m32", "--stats-dir", str(stats))
    f32 = _files(stats)
    capsys.readouterr()
    _cgm(pair, "m16", "--dtype", "bfloat16", "--stats-dir", str(stats))
    text = capsys.readouterr().out
    assert "reusing" not in text and text.count("(bfloat16)") == 2  # both recomputed, in bfloat16
    assert {_dtype_of(stats / f"{r}.safetensors") for r in f32} == {"bfloat16"}
    bf16 = _files(stats)
    for role, tensors in f32.items():
        num = sum(float((bf16[role][k].double() - v.double()).norm()) ** 2 for k, v in tensors.items())
        den = sum(float(v.double().norm()) ** 2 for v in tensors.values())
        assert 0 < (num / den) ** 0.5 < 3e-2, role  # measured: general 1.05e-2, task 8.6e-3
    m32, m16 = (load_file(str(pair / o / "model.safetensors")) for o in ("m32", "m16"))
    base, ft = (load_file(str(pair / d / "model.safetensors")) for d in ("base", "ft"))
    scope = f32["fisher_task"]
    num = sum(float((m16[k].double() - m32[k].double()).norm()) ** 2 for k in scope)
    den = sum(float((ft[k].double() - base[k].double()).norm()) ** 2 for k in scope)
    assert 0 < (num / den) ** 0.5 < 1e-2  # ‖θ_bf16 − θ_fp32‖ / ‖Δ‖ in scope, measured 2.1e-3
    for k, v in m32.items():
        if k not in scope:
            assert torch.equal(m16[k], v) and torch.equal(v, ft[k]), k  # out of scope: the fine-tuned tensor
    capsys.readouterr()
    _cgm(pair, "m16", "--dtype", "bfloat16", "--stats-dir", str(stats))
    assert capsys.readouterr().out.count("reusing") == 2  # the same dtype again: reused
    _cgm(pair, "m32", "--stats-dir", str(stats))
    assert "reusing" not in capsys.readouterr().out
    again = _files(stats)
    assert all(
        torch.equal(again[r][k], v) for r in f32 for k, v in f32[r].items()
    )  # float32 again, deterministic


# ---------------------------------------------------------------------------------------------- TF32
def _flags() -> tuple:
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
        torch.get_float32_matmul_precision(),
    )


@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_sets_the_cuda_flags_and_puts_every_setting_back(start, enabled):
    before_all = tf32_state()
    with tf32(not enabled):  # on its exit, the settings before the test come back, whatever it set inside
        torch.backends.cuda.matmul.allow_tf32 = start  # TF32 already on (or off) by PyTorch's own switch
        before = tf32_state()
        with tf32(enabled):
            want = "tf32" if enabled else "ieee"
            assert _flags() == (enabled, enabled, want, want, "high" if enabled else "highest")
        assert tf32_state() == before
        with pytest.raises(KeyError), tf32(enabled):
            raise KeyError("inside")
        assert tf32_state() == before
    assert tf32_state() == before_all


def test_tf32_changes_nothing_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 300, generator=g), torch.randn(300, 50, generator=g)
    ieee = a @ b
    with tf32(True):
        assert torch.equal(a @ b, ieee)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA matmul mode")
def test_tf32_on_cuda_rounds_the_inputs_and_no_tf32_does_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 256, generator=g)
    exact = a.double() @ b.double()
    scale = float(exact.abs().mean())
    with tf32(False):
        ieee = float(((a.cuda() @ b.cuda()).cpu().double() - exact).abs().max()) / scale
    with tf32(True):
        fast = float(((a.cuda() @ b.cuda()).cpu().double() - exact).abs().max()) / scale
    assert ieee < 1e-4 and fast > 10 * ieee  # TF32 keeps 10 mantissa bits of the inputs


@pytest.mark.parametrize(
    "command, target",
    [
        (
            ["stats", "fisher", "M", "--data", "D", "--out", "o.safetensors"],
            "forgetless.stats.run.compute_statistics",
        ),
        (
            ["cgm", "B", "F", "--general-data", "G", "--task-data", "T", "--out", "O"],
            "forgetless.chains.cgm.cgm_chain",
        ),
        (["finetune", "M", "--data", "D", "--out", "O"], "forgetless.train.finetune"),
        (["eval", "M", "--tasks", "t"], "forgetless.eval.report.run_eval"),
    ],
)
def test_commands_run_under_the_tf32_switch_and_restore_it(command, target, monkeypatch):
    seen: list[tuple] = []
    monkeypatch.setattr(target, lambda *a, **k: seen.append(_flags()))
    before = tf32_state()
    main(command)
    main([*command, "--no-tf32"])
    assert seen == [(True, True, "tf32", "tf32", "high"), (False, False, "ieee", "ieee", "highest")]
    assert tf32_state() == before


@pytest.mark.parametrize("given, want", [([], "float32"), (["--dtype", "bfloat16"], "bfloat16")])
def test_continual_add_passes_its_dtype_to_the_gram_pass(given, want, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr("forgetless.chains.continual.add_task", lambda *a, **k: seen.append(k["gram_dtype"]))
    main(["continual", "add", "S", "--adapter", "A", "--data", "D", *given])
    assert seen == [want]
