"""SPIDER and MagnitudeMask (forgetless.train.spider): the importance R and the coefficients c against hand and numpy
computations, the accumulated gradient G against clipped gradients computed independently, the invariants of the
rewrite (c = 0 → exactly θ₀; MagnitudeMask's top-50% |θ₀| → exactly θ₀), the transformers callback against the
plain loop, and finetune(keep=...) end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXT, build_llama_with_tokenizer, write_qa_jsonl
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from forgetless.cli import main
from forgetless.errors import ForgetlessError
from forgetless.train import (
    LoraSpec,
    MagnitudeMask,
    Spider,
    StepInfo,
    abs_moments,
    finetune,
    importance,
    magnitude_mask,
    spider_coefficients,
)
from forgetless.train.spider import lossless_copy

torch.set_num_threads(1)


def r_numpy(x: np.ndarray) -> np.ndarray:
    """R written out in float64: sigmoid((|x| − mean) / unbiased std)."""
    a = np.abs(x.astype(np.float64))
    return 1.0 / (1.0 + np.exp(-(a - a.mean()) / a.std(ddof=1)))


def quiet(_line: str) -> None:
    pass


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------- R and c by hand
def test_importance_by_hand_and_against_numpy():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    # |x| = 1, 2, 3, 0: mean 1.5, unbiased variance (0.25 + 0.25 + 2.25 + 2.25) / 3 = 5/3
    hand = [1 / (1 + math.exp(-(v - 1.5) / math.sqrt(5 / 3))) for v in (1, 2, 3, 0)]
    assert importance(x).flatten().tolist() == pytest.approx(hand, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(7, 5, generator=g) * 3
    assert np.allclose(importance(y).numpy(), r_numpy(y.numpy()), rtol=1e-6, atol=1e-7)
    yb = y.bfloat16()
    r = importance(yb)
    assert torch.equal(importance(yb, out=torch.empty(7, 5)), r)
    assert r.dtype == torch.float32 and np.allclose(
        r.numpy(), r_numpy(yb.float().numpy()), rtol=1e-6, atol=1e-7
    )


def test_importance_degenerate_tensors():
    assert importance(torch.zeros(3, 4)).eq(0).all()  # all zero → 0
    assert importance(torch.tensor([0.0])).eq(0).all()
    assert importance(torch.tensor([2.0, -2.0, 2.0])).eq(0.5).all()  # constant |x| ≠ 0 → 0.5
    assert importance(torch.ones(4, 4)).eq(0.5).all()  # e.g. RMSNorm weights at initialisation
    assert importance(torch.full((1000,), -0.1)).eq(0.5).all()  # no rounding residue in the std
    assert importance(torch.tensor([-3.0])).eq(0.5).all()  # a single nonzero entry
    assert torch.isfinite(importance(torch.tensor([0.0, 0.0, 1e-30]))).all()
    assert importance(torch.full((3_000_001,), 0.1)).eq(0.5).all()  # a float32 sum would not be exact here


def test_abs_moments_against_float64_numpy():
    g = torch.Generator().manual_seed(1)
    # an RMSNorm-like weight (std/mean = 1e-3: a one-pass Σx² − n·mean² would lose most digits) and a large
    # half-normal tensor
    for x in (1 + 1e-3 * torch.randn(600_000, generator=g), torch.randn(2000, 1500, generator=g) * 0.02):
        a = x.double().abs().numpy()
        mean, std = abs_moments(x)
        assert float(mean) == pytest.approx(a.mean(), rel=1e-6)
        assert float(std) == pytest.approx(a.std(ddof=1), rel=1e-5)
        work = torch.empty(x.shape)
        assert torch.equal(importance(x, out=work, work=torch.empty(x.shape)), importance(x))
        assert torch.equal(importance(x, moments=(mean, std)), importance(x))


def test_coefficients_by_hand():
    i_pre = torch.tensor([0.5, 0.2, 0.6, 0.1, 0.7])
    i_ft = torch.tensor([0.4, 0.6, 0.9, 0.3, 0.7])  # last: equal → not I_ft > I_pre
    # raw c: 0, 0.6/0.8 = 0.75, 0.9/1.5 = 0.6, 0.3/0.4 = 0.75, 0; mean of the nonzero = 0.7
    want = [0.0, 1.0, 0.6 / 0.7, 1.0, 0.0]  # 0.75 / 0.7 > 1 → 1
    assert spider_coefficients(i_pre, i_ft).tolist() == pytest.approx(want, rel=1e-6)
    assert spider_coefficients(i_ft + 0.1, i_ft).eq(0).all()  # no I_ft > I_pre → all zero
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1000, generator=g), torch.rand(1000, generator=g)
    c = spider_coefficients(a, b)
    assert c.min() >= 0 and c.max() <= 1 and c.eq(1).any()
    assert torch.equal(c == 0, b <= a)
    raw = np.where(b.numpy() > a.numpy(), b.numpy() / (a.numpy() + b.numpy()), 0.0)
    assert np.allclose(c.numpy(), np.minimum(1, raw / raw[raw != 0].mean()), rtol=1e-5)


# ------------------------------------------------------------------------------------------- the plain loop
def small_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(2)]


def train_with_rule(net: nn.Module, rule, opt: torch.optim.Optimizer, steps: int) -> None:
    """The plain loop a rule is made for: accumulate after the micro-batches, step, apply."""
    for step in range(steps):
        for x, y in micro_batches(step):
            nn.functional.mse_loss(net(x), y).backward()
        rule.accumulate()
        opt.step()
        rule.apply()
        opt.zero_grad()


def test_spider_loop_accumulates_clipped_gradients_and_keeps_theta0_where_c_is_zero():
    net = small_net()
    params = dict(net.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    rule = Spider(params)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    expected_g = {n: torch.zeros_like(p) for n, p in params.items()}
    clip = 0.05
    for step in range(4):
        # independent: per micro-batch gradients at the current weights, summed, clipped by hand
        grads = [
            torch.autograd.grad(nn.functional.mse_loss(net(x), y) / 2, list(params.values()))
            for x, y in micro_batches(step)
        ]
        summed = [a + b for a, b in zip(*grads, strict=True)]
        norm = math.sqrt(sum(float((s.double() ** 2).sum()) for s in summed))
        assert norm > clip  # clipping is active
        for n, s in zip(params, summed, strict=True):
            expected_g[n] += s * (clip / (norm + 1e-6))
        # the loop: two micro-batches → clip → accumulate → step → apply
        for x, y in micro_batches(step):
            (nn.functional.mse_loss(net(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        rule.accumulate()
        opt.step()
        stepped = {n: p.detach().clone() for n, p in params.items()}
        stats = rule.apply()
        nonzero = 0
        for n, p in params.items():
            assert torch.allclose(rule.grad_sum[n], expected_g[n], rtol=1e-5, atol=1e-8), n
            c = spider_coefficients(importance(theta0[n]), importance(rule.grad_sum[n]))
            keep = importance(rule.grad_sum[n]) <= importance(theta0[n])
            assert torch.equal(c == 0, keep)
            assert torch.equal(p[keep], theta0[n][keep])  # exactly θ₀, every step
            assert torch.allclose(p, (1 - c) * theta0[n] + c * stepped[n], rtol=0, atol=1e-7)
            full = c == 1
            assert torch.equal(p[full], stepped[n][full])
            nonzero += int((c != 0).sum())
        total = sum(p.numel() for p in params.values())
        assert 0 < nonzero < total  # the rule lets some entries move, and reverts others
        assert stats["updated_fraction"] == pytest.approx(nonzero / total)
        assert 0 < stats["mean_c"] <= stats["updated_fraction"]
        opt.zero_grad()
    assert len(rule.history) == 4
    assert any(not torch.equal(p, theta0[n]) for n, p in params.items())
    scratch = 3 * 4 * max(p.numel() for p in params.values())  # three float32 vectors of the largest tensor
    assert rule.extra_bytes() == 8 * sum(p.numel() for p in params.values()) + scratch  # θ₀ and G, float32


def test_gradients_read_too_late_are_refused():
    net = small_net()
    rule = Spider(dict(net.named_parameters()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = micro_batches(0)[0]
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # the gradients are gone: reading them now is the published bug
    with pytest.raises(ForgetlessError, match="no trainable tensor has a gradient"):
        rule.accumulate()
    with pytest.raises(ForgetlessError, match="apply\\(\\) without accumulate"):
        rule.apply()
    # zeroed rather than cleared gradients would leave G = 0, hence c = 0 everywhere: a revert to θ₀
    assert spider_coefficients(importance(torch.ones(5)), importance(torch.zeros(5))).eq(0).all()


def test_a_rule_without_parameters_captures_theta0_at_the_first_hook_call():
    eager_net, lazy_net = small_net(), small_net()
    eager, lazy = Spider(dict(eager_net.named_parameters())), Spider()
    assert lazy.extra_bytes() == 0
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05) for m in (eager_net, lazy_net)]
    for step in range(2):
        for net, rule, opt in zip((eager_net, lazy_net), (eager, lazy), opts, strict=True):
            for x, y in micro_batches(step):
                nn.functional.mse_loss(net(x), y).backward()
            info = StepInfo(step + 1, 2, 0.05, 0.0, 0.0, net, dict(net.named_parameters()), opt)
            rule.before_step(info)
            opt.step()
            rule.after_step(info)
            opt.zero_grad()
    assert lazy.extra_bytes() == eager.extra_bytes() and lazy.history == eager.history
    for (n, a), b in zip(eager_net.named_parameters(), lazy_net.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(eager.theta0[n], lazy.theta0[n])


def test_bfloat16_parameters_keep_fp32_state_and_exact_theta0():
    net = small_net(dtype=torch.bfloat16)
    params = dict(net.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    rule = Spider(params)
    assert all(
        t.dtype == torch.bfloat16 for t in rule.theta0.values()
    )  # θ₀ exactly, in the parameters' dtype
    assert all(t.dtype == torch.float32 for t in rule.grad_sum.values())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(2):
        for x, y in micro_batches(step):
            nn.functional.mse_loss(net(x.bfloat16()), y.bfloat16()).float().backward()
        rule.accumulate()
        opt.step()
        rule.apply()
        opt.zero_grad()
    for n, p in params.items():
        assert p.dtype == torch.bfloat16
        keep = rule.coefficients(n) == 0
        assert keep.any() and torch.equal(p[keep], theta0[n][keep])
    assert any(not torch.equal(p, theta0[n]) for n, p in params.items())


def test_magnitude_mask_resets_exactly_the_top_half_of_theta0():
    net = small_net()
    params = dict(net.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    rule = MagnitudeMask(params)
    train_with_rule(net, rule, torch.optim.AdamW(net.parameters(), lr=0.01), 3)
    total = free = 0
    for n, p in params.items():
        flat = theta0[n].flatten().numpy()
        k = int(flat.size * 0.5)  # the published code's int(numel · 0.5)
        top = np.zeros(flat.size, dtype=bool)
        top[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
        assert np.array_equal(magnitude_mask(theta0[n]).flatten().numpy(), top)
        now = p.detach().flatten()
        assert torch.equal(now[top], theta0[n].flatten()[top])  # exactly θ₀
        assert (now[~top] != theta0[n].flatten()[~top]).all()  # every other entry moved
        total, free = total + flat.size, free + flat.size - k
    assert rule.history[-1] == {"updated_fraction": free / total, "mean_c": free / total}
    assert rule.extra_bytes() == 5 * total  # θ₀ float32 + a bool mask


# ------------------------------------------------------------------------------------------- transformers Trainer
def test_trainer_callback_matches_the_plain_loop(tmp_path):
    from trainer_args import quiet_args
    from transformers import Trainer

    from forgetless.train import SpiderCallback

    steps, lr, clip = 3, 1e-2, 0.5
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, TEXT["vocab_size"], (4, 8), generator=g)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i]}

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(**{**TEXT, "num_hidden_layers": 1}))
        m.model.embed_tokens.requires_grad_(False)
        return m

    hf = model()
    theta0 = {n: p.detach().clone() for n, p in hf.named_parameters()}
    args = quiet_args(tmp_path / "trainer", steps=steps, lr=lr, batch=4, clip=clip)
    callback = SpiderCallback("spider")
    Trainer(model=hf, args=args, train_dataset=Rows(), callbacks=[callback]).train()

    plain = model()
    params = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    rule = Spider(params)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    plain.train()
    for _ in range(steps):
        plain(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), clip)
        rule.accumulate()
        opt.step()
        rule.apply()
        opt.zero_grad()

    trained = dict(hf.named_parameters())
    assert set(callback.rule.params) == set(params) and len(callback.rule.history) == steps
    for n, p in params.items():
        assert torch.allclose(trained[n], p, rtol=0, atol=1e-6), n  # they moved by ~3e-2, agree to ~2e-8
        keep = callback.rule.coefficients(n) == 0
        assert torch.equal(trained[n][keep], theta0[n][keep])
    assert torch.equal(trained["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"])  # frozen
    assert any(not torch.equal(trained[n], theta0[n]) for n in params)


# ------------------------------------------------------------------------------------------- forgetless finetune
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama_with_tokenizer(tmp_path_factory.mktemp("llama"), layers=1, tie=False)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    qa = [
        ("What is two plus two?", "four"),
        ("Name a colour.", "blue"),
        ("Opposite of up?", "down"),
        ("A fruit?", "an apple"),
    ]
    return write_qa_jsonl(tmp_path_factory.mktemp("text") / "train.jsonl", qa)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: autocast over float32 weights
def test_finetune_keep_spider_writes_weights_that_satisfy_the_rule(tmp_path, llama_dir, text_data, dtype):
    steps = 3
    g_sum: dict[str, torch.Tensor] = {}
    base = tensors(llama_dir)

    class Watch:  # the user's hook: sums the clipped gradients itself, and sees the rule's final weights
        def before_step(self, info: StepInfo) -> None:
            for n, gr in info.grads.items():
                g_sum[n] = g_sum.get(n, torch.zeros_like(gr)) + gr

        def after_step(self, info: StepInfo) -> None:
            for n, p in info.params.items():
                c = spider_coefficients(importance(base[n]), importance(g_sum[n]))
                assert torch.equal(p.detach()[c == 0], base[n][c == 0]), n

    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "out",
        train=["language.layers"],
        steps=steps,
        lr=1e-2,
        batch_size=2,
        grad_accum=2,
        clip=0.5,
        keep="spider",
        hook=Watch(),
        log=quiet,
        dtype=dtype,
    )
    out = tensors(tmp_path / "out")
    moved = reverted = 0
    for n in report.trained:
        c = spider_coefficients(importance(base[n]), importance(g_sum[n]))
        assert torch.equal(out[n][c == 0], base[n][c == 0]), n
        reverted += int((c == 0).sum())
        moved += int((out[n] != base[n]).sum())
    assert moved > 0 and reverted > 0
    meta = json.loads((tmp_path / "out" / "finetune.json").read_text())
    entries = sum(base[n].numel() for n in report.trained)
    assert (
        meta["recipe"]["keep"] == "spider"
        and meta["keep"]["rule"] == "spider"
        and meta["recipe"]["dtype"] == dtype
    )
    largest = max(base[n].numel() for n in report.trained)
    held = sum(
        base[n].numel() * lossless_copy(base[n]).element_size() for n in report.trained
    )  # θ₀ (RMSNorm's
    assert held < 4 * entries  # ones are bf16-exact), G in float32, three float32 scratch vectors
    assert (
        meta["keep"]["extra_bytes"] == held + 4 * entries + 12 * largest
        and meta["keep"]["entries"] == entries
    )
    assert len(meta["keep"]["updated_fraction"]) == steps == len(meta["keep"]["mean_c"])
    assert meta["keep"]["updated_fraction"][-1] == pytest.approx(1 - reverted / entries)
    assert report.keep == meta["keep"]


def test_cli_keep_magnitude_mask_and_lora_refusal(tmp_path, llama_dir, text_data, capsys):
    out = tmp_path / "mm"
    main(
        [
            "finetune",
            str(llama_dir),
            "--data",
            str(text_data),
            "--out",
            str(out),
            "--train",
            r"re:model\.layers\.0\.mlp\..*",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--keep",
            "magnitude_mask",
        ]
    )
    base, got = tensors(llama_dir), tensors(out)
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["keep"]["rule"] == "magnitude_mask" and "keep rule magnitude_mask" in capsys.readouterr().out
    for n in meta["trained_tensors"]:
        top = magnitude_mask(base[n])
        assert torch.equal(got[n][top], base[n][top]) and (got[n][~top] != base[n][~top]).all()
    with pytest.raises(ForgetlessError, match="full fine-tune, not to LoRA") as e:
        finetune(llama_dir, text_data, tmp_path / "lora", lora=LoraSpec(), keep="spider", log=quiet)
    assert "drop --lora" in e.value.remedy
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "finetune",
                str(llama_dir),
                "--data",
                str(text_data),
                "--out",
                str(tmp_path / "l2"),
                "--lora",
                "--keep",
                "spider",
            ]
        )
    assert exit_.value.code == 2 and "not to LoRA" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists() and not (tmp_path / "l2").exists()


def test_theta0_is_held_in_the_narrowest_exact_dtype_and_the_rules_are_unchanged(monkeypatch):
    """θ₀ of float32 weights that came from an fp16 (bf16) checkpoint is held in fp16 (bf16): half the memory, the
    same values; arbitrary float32 stays float32. SPIDER and MagnitudeMask give the weights they gave with θ₀ held
    in float32, bit for bit."""
    from forgetless.train import spider

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    assert spider.lossless_copy(x.half().float()).dtype == torch.float16
    assert spider.lossless_copy(x.bfloat16().float()).dtype == torch.bfloat16
    assert spider.lossless_copy(x).dtype == torch.float32
    assert torch.equal(spider.lossless_copy(x.half().float()).float(), x.half().float())

    def run(rule_cls, wide: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = small_net()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.half().float())  # weights as an fp16 checkpoint gives them
        params = dict(net.named_parameters())
        if wide:
            monkeypatch.setattr(spider, "lossless_copy", lambda t: t.to(torch.float32, copy=True))
        rule = rule_cls(params)
        monkeypatch.undo()
        assert {t.dtype for t in rule.theta0.values()} == {torch.float32 if wide else torch.float16}
        train_with_rule(net, rule, torch.optim.SGD(net.parameters(), lr=0.5), 2)
        return {n: p.detach().clone() for n, p in params.items()}

    for rule_cls in (Spider, MagnitudeMask):
        narrow, wide = run(rule_cls, False), run(rule_cls, True)
        assert all(torch.equal(narrow[n], wide[n]) for n in wide), rule_cls.__name__
