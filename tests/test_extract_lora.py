"""`forgetless extract-lora`: a full fine-tune's Linear deltas as a PEFT LoRA adapter, checked against PEFT's own
merge and an independent truncated SVD."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llava_original
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_original_llava import smol_tokenizer
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

import forgetless
from forgetless.chains import extract_lora as ex
from forgetless.checkpoint.lora import AdaptedReader, LoraAdapter
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.cli import cli
from forgetless.errors import ForgetlessError
from forgetless.stats.fisher import checkpoint_names

PROJ = re.compile(r"(proj|fc\d|linear_\d|mm_projector\.\d|lm_head)\.weight$")


def _finetune(base: Path, out: Path, *, low_rank: int | None = None, seed: int = 1, also=()) -> Path:
    """A copy of `base` with every Linear weight moved (by a rank-`low_rank` matrix, else a full-rank one) and the
    tensors named in `also` (norms, biases) shifted."""
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(base / "model.safetensors"))
    for k, w in sd.items():
        if PROJ.search(k):
            out_, in_ = w.shape
            if low_rank is None:
                d = torch.randn(out_, in_, generator=g)
            else:
                d = torch.randn(out_, low_rank, generator=g) @ torch.randn(low_rank, in_, generator=g)
            sd[k] = w + 0.01 * d / math.sqrt(low_rank or 1)
        elif k in also:
            sd[k] = w + 0.05 * torch.randn(w.shape, generator=g)
    out.mkdir(parents=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _truncation(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r truncation of delta, by an independent float64 SVD."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _merged(model, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter loaded in PEFT and merged into `model`: checkpoint name -> weight."""
    peft = PeftModel.from_pretrained(model, adapter)
    merged = peft.merge_and_unload()
    names = checkpoint_names(merged)
    return {names[n]: p.detach() for n, p in merged.named_parameters() if n in names}


def _card_rows(adapter: Path) -> dict[str, tuple[int, float, float]]:
    rows = {}
    for line in (adapter / "README.md").read_text().splitlines():
        m = re.match(r"^\| (\S+) \| \d+×\d+ \| (\d+) \| (\S+) \| (\S+) \|$", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    return rows


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("extract")
    ft = _finetune(tiny_llama_dir, root / "ft", also=("model.layers.1.input_layernorm.weight",))
    return tiny_llama_dir, ft, root


def test_peft_merge_is_the_base_plus_the_rank_r_truncation(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    report = ex.extract_lora(base, ft, rank=3, out=tmp_path / "a", log=None)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["rank_pattern"] == {}
    assert cfg["modules_to_save"] == ["model.layers.1.input_layernorm"]
    assert len(report.modules) == 3 * 7 + 1  # 3 layers × (q, k, v, o, gate, up, down) + lm_head
    w0, w1 = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    got = _merged(LlamaForCausalLM.from_pretrained(base), tmp_path / "a")
    for n, w in w0.items():
        want = w.double() + _truncation(w1[n] - w, 3) if PROJ.search(n) else w1[n].double()
        torch.testing.assert_close(got[n].double(), want, rtol=0, atol=2e-6, msg=n)


def test_full_rank_reproduces_the_fine_tune(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    report = ex.extract_lora(base, ft, rank=10_000, out=tmp_path / "a", log=None)
    assert {m.rank for m in report.modules} == {
        16,
        32,
    }  # the weights' smaller sides: k, v 16×32, the others 32
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and len(cfg["rank_pattern"]) == 6 and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert max(m.error for m in report.modules) < 1e-5
    w1 = load_file(str(ft / "model.safetensors"))
    got = _merged(LlamaForCausalLM.from_pretrained(base), tmp_path / "a")
    for n, w in w1.items():
        torch.testing.assert_close(got[n], w, rtol=0, atol=2e-6, msg=n)


def test_card_errors_and_energies_equal_a_brute_force_computation(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    ex.extract_lora(base, ft, rank=5, out=tmp_path / "a", log=None)
    rows = _card_rows(tmp_path / "a")
    assert len(rows) == 22
    w0, w1 = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    merged = _merged(LlamaForCausalLM.from_pretrained(base), tmp_path / "a")
    for module, (r, err, energy) in rows.items():
        n = module + ".weight"
        delta = (w1[n] - w0[n]).double()
        written = merged[n].double() - w0[n].double()
        s2 = torch.linalg.svdvals(delta).square()
        assert r == 5
        assert err == pytest.approx(float((delta - written).norm() / delta.norm()), rel=1e-4)
        assert energy == pytest.approx(float(s2[:5].sum() / s2.sum()), rel=1e-5)
        assert err == pytest.approx(math.sqrt(1 - energy), rel=1e-4)  # Eckart–Young


def test_randomized_svd_close_to_exact_on_a_low_rank_delta(tiny_llama_dir, tmp_path):
    ft = _finetune(tiny_llama_dir, tmp_path / "ft", low_rank=2)
    exact = ex.extract_lora(tiny_llama_dir, ft, rank=4, out=tmp_path / "e", log=None)
    rand = ex.extract_lora(tiny_llama_dir, ft, rank=4, out=tmp_path / "r", svd="randomized", log=None)
    assert max(m.error for m in exact.modules) < 1e-5 and max(m.error for m in rand.modules) < 1e-5
    a, b = (
        load_file(str(tmp_path / "e" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "r" / "adapter_model.safetensors")),
    )
    for k in a:
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            torch.testing.assert_close(b[kb] @ b[k], a[kb] @ a[k], rtol=0, atol=1e-6)


def test_llava_adapter_named_as_peft_finds_the_modules(tiny_llava_dir, tmp_path):
    also = ("multi_modal_projector.linear_1.bias", "vision_tower.post_layernorm.weight")
    ft = _finetune(tiny_llava_dir, tmp_path / "ft", also=also)
    ex.extract_lora(tiny_llava_dir, ft, rank=4, out=tmp_path / "a", log=None)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == [
        "model.multi_modal_projector.linear_1",
        "model.vision_tower.post_layernorm",
    ]
    assert "model.language_model.layers.0.self_attn.q_proj" in cfg["target_modules"]
    assert "model.multi_modal_projector.linear_1" not in cfg["target_modules"]
    w0, w1 = load_file(str(tiny_llava_dir / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    got = _merged(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), tmp_path / "a")
    for n, w in w0.items():
        saved = n.startswith("multi_modal_projector.linear_1.") or n in also
        want = w1[n].double() if saved or not PROJ.search(n) else w.double() + _truncation(w1[n] - w, 4)
        torch.testing.assert_close(got[n].double(), want, rtol=0, atol=2e-6, msg=n)


def test_original_llava_adapter_uses_the_folders_names(tiny_llava_dir, tmp_path):
    base = build_tiny_llava_original(tiny_llava_dir, tmp_path / "orig")
    smol_tokenizer().save_pretrained(base)  # the tokenizer the LLaVA code saves beside its weights
    ft = _finetune(base, tmp_path / "ft", also=("model.norm.weight",))
    ex.extract_lora(base, ft, rank=32, out=tmp_path / "a", log=None)
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.mm_projector.0.lora_A.weight" in keys
    assert "base_model.model.model.norm.weight" in keys
    # forgetless reads it back as BASE+ADAPTER: full rank gives the fine-tune
    with CheckpointReader(base) as b, CheckpointReader(ft) as f:
        adapted = AdaptedReader(b, LoraAdapter(tmp_path / "a", b.names()))
        for n in f.names():
            torch.testing.assert_close(adapted.get(n).float(), f.get(n).float(), rtol=0, atol=2e-6, msg=n)


def test_extracted_adapters_enter_an_adapter_space_merge(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    ft2 = _finetune(base, tmp_path / "ft2", seed=2)
    for i, f in enumerate((ft, ft2)):
        ex.extract_lora(base, f, rank=4, out=tmp_path / f"a{i}", scope=["language.layers"], log=None)
    recipe = {
        "method": "lora_task_arithmetic",
        "base": str(base),
        "models": [str(tmp_path / "a0"), str(tmp_path / "a1")],
        "parameters": {"rank": 8},  # the exact sum of two rank-4 updates
    }
    forgetless.merge(recipe, out=tmp_path / "m", progress=False, log=None)
    merged, a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("m", "a0", "a1"))
    k = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    kb = k.replace("lora_A", "lora_B")
    want = a[kb] @ a[k] + b[kb] @ b[k]
    torch.testing.assert_close(merged[kb] @ merged[k], want, rtol=1e-4, atol=1e-6)
    # the norm a0 saves whole (modules_to_save) is averaged with the base's, which a1 leaves as it is
    norm = "base_model.model.model.layers.1.input_layernorm.weight"
    w0 = load_file(str(base / "model.safetensors"))["model.layers.1.input_layernorm.weight"]
    torch.testing.assert_close(merged[norm], (a[norm] + w0) / 2)


def test_scope_limits_what_is_read_and_written(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    report = ex.extract_lora(base, ft, rank=2, out=tmp_path / "a", scope=["language.layers[0]"], log=None)
    assert {m.module for m in report.modules} == {
        f"model.layers.0.{p}"
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert report.saved == []  # the changed norm is in layer 1, out of scope


@pytest.fixture()
def no_work(monkeypatch):
    """Fails the test if extraction reaches the model's modules (a refusal must come before)."""

    def boom(*a, **k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(ex, "_targets", boom)


def test_refusals_before_any_work(llama_pair, tiny_llava_dir, tmp_path, no_work):
    base, ft, _ = llama_pair
    with pytest.raises(ForgetlessError, match="rank"):
        ex.extract_lora(base, ft, rank=0, out=tmp_path / "a", log=None)
    with pytest.raises(ForgetlessError, match="rank"):
        ex.extract_lora(base, ft, rank=-3, out=tmp_path / "a", log=None)
    with pytest.raises(ForgetlessError, match="llava"):
        ex.extract_lora(base, tiny_llava_dir, rank=2, out=tmp_path / "a", log=None)
    with pytest.raises(ForgetlessError, match="input"):
        ex.extract_lora(base, ft, rank=2, out=ft / "adapter", log=None)
    with pytest.raises(ForgetlessError, match="input"):
        ex.extract_lora(base, ft, rank=2, out=base, force=True, log=None)
    with pytest.raises(ForgetlessError, match="svd"):
        ex.extract_lora(base, ft, rank=2, out=tmp_path / "a", svd="fast", log=None)
    assert not (tmp_path / "a").exists() and not list(ft.glob("adapter*"))


def test_different_shapes_refused(llama_pair, tmp_path, no_work):
    base, ft, _ = llama_pair
    other = tmp_path / "other"
    other.mkdir()
    sd = load_file(str(ft / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(sd, str(other / "model.safetensors"))
    shutil.copy(ft / "config.json", other / "config.json")
    with pytest.raises(ForgetlessError, match="differ from the base"):
        ex.extract_lora(base, other, rank=2, out=tmp_path / "a", log=None)


def test_unchanged_fine_tune_refused_and_nothing_left(tiny_llama_dir, tmp_path):
    with pytest.raises(ForgetlessError, match="nothing to extract"):
        ex.extract_lora(tiny_llama_dir, tiny_llama_dir, rank=2, out=tmp_path / "a", log=None)
    assert list(tmp_path.iterdir()) == []


def test_tied_embedding_change_refused(tmp_path):
    from conftest import TEXT
    from transformers import LlamaConfig

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TEXT, "tie_word_embeddings": True})).save_pretrained(tmp_path / "b")
    ft = _finetune(tmp_path / "b", tmp_path / "ft", also=("model.embed_tokens.weight",))
    with pytest.raises(ForgetlessError, match="tied"):
        ex.extract_lora(tmp_path / "b", ft, rank=2, out=tmp_path / "a", log=None)
    report = ex.extract_lora(
        tmp_path / "b", ft, rank=2, out=tmp_path / "a", scope=["language.layers"], log=None
    )
    assert len(report.modules) == 21 and report.saved == []


def test_cli(llama_pair, tmp_path):
    from click.testing import CliRunner

    base, ft, _ = llama_pair
    out = tmp_path / "a"
    res = CliRunner().invoke(
        cli,
        [
            "extract-lora",
            str(base),
            str(ft),
            "--rank",
            "2",
            "--out",
            str(out),
            "--svd",
            "randomized",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "22 Linear layer(s) factored" in res.output
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert keys["base_model.model.lm_head.lora_A.weight"].dtype == torch.bfloat16
    res = CliRunner().invoke(
        cli, ["extract-lora", str(base), str(ft), "--rank", "0", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code != 0 and not (tmp_path / "b").exists()


def test_cli_refuses_several_processes(monkeypatch, tmp_path, capsys):
    from forgetless.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", str(tmp_path), str(tmp_path), "--rank", "2", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "runs on one process" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_linear_only_leaves_other_changes_out_and_the_adapter_enters_lpm(llama_pair, tmp_path):
    """``linear_only``: the changed norm is left out (listed in the report and the card, nothing under
    modules_to_save), the Linear deltas are the same truncations; LPM (`continual add`) takes that adapter and
    refuses the one that saves the norm whole."""
    from test_continual import _write_gram

    from forgetless.chains.continual import add_task

    base, ft, _ = llama_pair
    norm = "model.layers.1.input_layernorm.weight"
    full = ex.extract_lora(base, ft, rank=2, out=tmp_path / "full", log=None)
    only = ex.extract_lora(base, ft, rank=2, out=tmp_path / "only", linear_only=True, log=None)
    assert full.saved == ["model.layers.1.input_layernorm"] and full.left_out == []
    assert only.saved == [] and only.left_out == [norm]
    assert json.loads((tmp_path / "only" / "adapter_config.json").read_text())["modules_to_save"] is None
    assert (
        f"left out (--linear-only: the adapter does not carry their change): {norm}"
        in (tmp_path / "only" / "README.md").read_text()
    )
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("only", "full"))
    assert set(b) - set(a) == {f"base_model.model.{norm}"}
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same factors
    gram = tmp_path / "g.safetensors"
    _write_gram(base, gram, seed=0)
    with pytest.raises(ForgetlessError, match="modules_to_save"):
        add_task(tmp_path / "s-full", adapter=tmp_path / "full", gram=gram, base=base, out=None, log=None)
    add_task(tmp_path / "s", adapter=tmp_path / "only", gram=gram, base=base, out=tmp_path / "m", log=None)
    merged, w0 = (
        load_file(str(tmp_path / "m" / "model.safetensors")),
        load_file(str(base / "model.safetensors")),
    )
    assert torch.equal(merged[norm], w0[norm])  # not carried: the base's
    assert not torch.equal(
        merged["model.layers.0.mlp.down_proj.weight"], w0["model.layers.0.mlp.down_proj.weight"]
    )


def test_linear_only_of_a_fine_tune_that_moved_no_linear_is_refused(tiny_llama_dir, tmp_path):
    sd = load_file(str(tiny_llama_dir / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.1
    (tmp_path / "ft").mkdir()
    save_file(sd, str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "ft" / "config.json")
    with pytest.raises(ForgetlessError, match="every Linear weight in scope") as e:
        ex.extract_lora(
            tiny_llama_dir, tmp_path / "ft", rank=2, out=tmp_path / "a", linear_only=True, log=None
        )
    assert "--linear-only" in e.value.remedy and not (tmp_path / "a").exists()
