"""EWC and L2-SP in `forgetless finetune`: the penalty's gradient against its closed form λ F ⊙ (θ − θ₀), the
recorded penalty against λ/2 Σ F (θ − θ₀)², λ = 0 against plain fine-tuning bit for bit, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_llama_with_tokenizer, save_statistics_for, write_qa_jsonl
from safetensors.torch import load_file, save_file

from forgetless.errors import ForgetlessError
from forgetless.stats.store import model_fingerprints
from forgetless.train import finetune

torch.set_num_threads(1)
QA = [
    ("Capital of France?", "Paris"),
    ("Two plus two?", "four"),
    ("Colour of the sky?", "blue"),
    ("Opposite of up?", "down"),
]
TRAIN = ["re:layers\\.1\\.self_attn\\.(q|v)_proj\\.weight$"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("penalty")
    model = build_llama_with_tokenizer(root / "model", layers=2, tie=False)
    data = write_qa_jsonl(root / "data.jsonl", QA)
    weights = load_file(str(model / "model.safetensors"))
    names = [
        n for n in weights if n.startswith("model.layers.1.self_attn.") and n[-13:-7] in ("q_proj", "v_proj")
    ]
    g = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(weights[n].shape, generator=g) * 10 for n in names}
    save_statistics_for(model, root / "fisher.safetensors", fisher)
    return root, model, data, fisher, weights


class Grads:
    """Records, at every step, the clipped gradients and the weights before the optimizer's step."""

    def __init__(self):
        self.grads, self.weights = [], []

    def __call__(self, info):
        self.grads.append({k: p.grad.detach().clone() for k, p in info.params.items()})
        self.weights.append({k: p.detach().clone() for k, p in info.params.items()})


def run(setup, out, steps=2, **kw):
    root, model, data, _, _ = setup
    hook = Grads()
    report = finetune(
        model,
        data,
        root / out,
        train=TRAIN,
        steps=steps,
        batch_size=2,
        lr=1e-2,
        clip=None,
        hook=hook,
        device="cpu",
        log=None,
        tensorboard=False,
        force=True,
        **kw,
    )
    return hook, report


@pytest.mark.parametrize("keep", ["l2sp", "ewc"])
def test_the_penalty_adds_its_closed_form_gradient(setup, keep):
    root, _, _, fisher, weights = setup
    lam = 3.0
    extra = {"fisher": root / "fisher.safetensors"} if keep == "ewc" else {}
    plain, _ = run(setup, "plain")
    kept, report = run(setup, keep, keep=keep, strength=lam, **extra)
    for k, g in plain.grads[0].items():  # θ = θ₀ at the first step: no penalty gradient, the same update
        assert torch.equal(kept.grads[0][k], g), k
    penalty = 0.0
    for k in plain.grads[1]:
        theta1, theta0 = kept.weights[1][k], weights[k].float()
        assert torch.equal(theta1, plain.weights[1][k])
        f = fisher[k] if keep == "ewc" else torch.ones_like(theta0)
        want = lam * f * (theta1 - theta0)
        assert want.abs().max() > 0
        torch.testing.assert_close(kept.grads[1][k] - plain.grads[1][k], want, rtol=1e-4, atol=1e-7)
        penalty += 0.5 * lam * float((f * (theta1 - theta0) ** 2).sum())
    meta = json.loads((root / keep / "finetune.json").read_text())
    assert meta["keep"]["rule"] == keep and meta["keep"]["strength"] == lam
    assert meta["keep"]["penalty"][0] == 0.0 and meta["keep"]["penalty"][1] == pytest.approx(
        penalty, rel=1e-5
    )
    assert report.losses[0] == pytest.approx(
        run(setup, "again")[1].losses[0]
    )  # the reported loss is the data's


@pytest.mark.parametrize("keep", ["l2sp", "ewc"])
def test_strength_zero_is_plain_fine_tuning_bit_for_bit(setup, keep):
    root = setup[0]
    extra = {"fisher": root / "fisher.safetensors"} if keep == "ewc" else {}
    run(setup, "plain3", steps=3)
    run(setup, f"{keep}0", steps=3, keep=keep, strength=0.0, **extra)
    a, b = (
        load_file(str(root / "plain3" / "model.safetensors")),
        load_file(str(root / f"{keep}0" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_before_any_work(setup, tmp_path):
    root, model, data, fisher, _ = setup
    kw = {"train": TRAIN, "steps": 1, "device": "cpu", "log": None, "tensorboard": False}
    cases = [
        ({"keep": "ewc", "strength": 1.0}, "needs the general Fisher"),
        ({"keep": "l2sp"}, "strength must be a finite number"),
        ({"keep": "l2sp", "strength": -1.0}, "strength must be a finite number"),
        ({"keep": "spider", "strength": 1.0}, "--strength is the λ"),
        ({"keep": "l2sp", "strength": 1.0, "fisher": root / "fisher.safetensors"}, "--fisher is the Fisher"),
        ({"keep": "l2sp", "strength": 1.0, "fsdp": True}, "not built yet"),
    ]
    for options, match in cases:
        with pytest.raises(ForgetlessError, match=match):
            finetune(model, data, tmp_path / "out", **kw, **options)
    partial = save_statistics_for(model, tmp_path / "partial.safetensors", dict(list(fisher.items())[:1]))
    with pytest.raises(ForgetlessError, match="no Fisher for 1 trained tensor") as e:
        finetune(model, data, tmp_path / "out", keep="ewc", strength=1.0, fisher=partial, **kw)
    assert str(partial) in str(e.value)
    other = build_llama_with_tokenizer(
        tmp_path / "other", layers=2, tie=False, seed=1
    )  # same shapes, other θ₀
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file(
        fisher, str(elsewhere), metadata={"kind": "fisher", "num_samples": "4", **model_fingerprints(other)}
    )
    with pytest.raises(ForgetlessError, match="other weights than θ₀"):
        finetune(model, data, tmp_path / "out", keep="ewc", strength=1.0, fisher=elsewhere, **kw)
    assert not (tmp_path / "out").exists()
