"""The Fisher's per-sample products in the model's dtype: float32 kept bit for bit, bfloat16 rounded once (CPU) or
not at all (CUDA), and the error that adds to the diagonal Fisher of the embedded SmolLM2, measured against the
float32 products of the same bfloat16 model and against the float32 model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import forgetless.stats.fisher as fisher_module
from forgetless.embedded import export_smollm2
from forgetless.stats.data import Encoder, iter_batches, load_samples
from forgetless.stats.fisher import accumulate_fisher, linear_modules, per_sample_products
from forgetless.testbed.probes import text_probes


def _rows(dtype: torch.dtype, seed: int = 0, B: int = 3, R: int = 40, out: int = 24, inp: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, R, out, generator=g).to(dtype), torch.randn(B, R, inp, generator=g).to(dtype))


def _exact(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gᵀx per sample in float64 (exact for these sizes), and Σ|g||x|, the scale of the accumulation's error."""
    gd, xd = g.double(), x.double()
    return torch.einsum("bro,bri->boi", gd, xd), torch.einsum("bro,bri->boi", gd.abs(), xd.abs())


def test_float32_products_are_the_float32_bmm_bit_for_bit():
    g, x = _rows(torch.float32)
    got = per_sample_products(g, x)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.bmm(g.transpose(1, 2), x))  # the product the Fisher always took
    exact, scale = _exact(g, x)
    assert ((got.double() - exact).abs() <= 40 * 2.0**-23 * scale).all()


@pytest.mark.parametrize("pair", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_float16_on_the_cpu_and_mixed_dtypes_take_the_float32_product(pair):
    g, _ = _rows(pair[0])
    _, x = _rows(pair[1], seed=1)
    assert torch.equal(per_sample_products(g, x), torch.bmm(g.float().transpose(1, 2), x.float()))


def test_bfloat16_products_on_the_cpu_are_rounded_to_bfloat16_once():
    g, x = _rows(torch.bfloat16)
    got = per_sample_products(g, x)
    assert got.dtype == torch.float32 and torch.equal(got, got.bfloat16().float())  # bfloat16 values
    exact, scale = _exact(g, x)
    # one rounding to bfloat16 (unit roundoff 2⁻⁸) after a float32 accumulation over 40 rows
    assert ((got.double() - exact).abs() <= 2.0**-8 * exact.abs() + 40 * 2.0**-23 * scale).all()
    assert not torch.equal(got, torch.bmm(g.float().transpose(1, 2), x.float()))  # it is the bfloat16 product


def test_the_installed_torch_has_the_float32_output_product_cuda_takes():
    g, x = (t.to("meta") for t in _rows(torch.bfloat16))
    assert (
        torch.bmm(g.transpose(1, 2), x, out_dtype=torch.float32).dtype == torch.float32
    )  # shapes and dtypes only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's float32-output bfloat16 product")
def test_bfloat16_products_on_cuda_keep_the_float32_accumulation():
    g, x = _rows(torch.bfloat16)
    got = per_sample_products(g.cuda(), x.cuda()).cpu()
    exact, scale = _exact(g, x)
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= 40 * 2.0**-23 * scale + 1e-30).all()  # no bfloat16 rounding


@pytest.fixture(scope="module")
def smollm2_fishers(tmp_path_factory):
    """Diagonal Fisher sums of the embedded SmolLM2-135M over its last three decoder layers, on eight text probes:
    the float32 model; the bfloat16 model with float32 products (the path before); with its own products."""
    data = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n" for p in text_probes()[:32]
        )
    )
    smol = export_smollm2()
    batches = list(iter_batches(load_samples(data, n=8, seed=0), Encoder(smol), 8))
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()

    def fisher() -> dict[str, torch.Tensor]:
        params = {
            k: m.weight
            for k, m in linear_modules(model).items()
            if any(f".layers.{i}." in k for i in (27, 28, 29))
        }
        return accumulate_fisher(model, batches, params=params).sums

    f32 = fisher()
    model.to(torch.bfloat16)
    own = fisher()
    before = fisher_module.per_sample_products
    fisher_module.per_sample_products = lambda g, x: torch.bmm(g.float().transpose(1, 2), x.float())
    try:
        upcast = fisher()
    finally:
        fisher_module.per_sample_products = before
    return f32, upcast, own


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """‖a − b‖ / ‖b‖ over all tensors together, and the largest per tensor."""
    diff = {k: float((a[k].double() - b[k].double()).norm()) for k in b}
    norm = {k: float(b[k].double().norm()) for k in b}
    return (sum(d**2 for d in diff.values()) / sum(n**2 for n in norm.values())) ** 0.5, max(
        diff[k] / norm[k] for k in b
    )


def test_bfloat16_products_add_little_to_the_bfloat16_models_own_error(smollm2_fishers):
    f32, upcast, own = smollm2_fishers
    assert len(f32) == 21  # 7 Linear weights × 3 layers
    product, product_worst = _rel(own, upcast)
    model, model_worst = _rel(upcast, f32)
    # measured (x86 CPU with AMX, torch 2.13): the products 1.21e-3 overall, 3.0e-3 for the worst tensor; the
    # bfloat16 model itself 2.19e-2 overall, 7.4e-2 for the worst tensor; both together 2.20e-2
    assert 0 < product < 4e-3 and product_worst < 1e-2
    assert product < model / 3 and product_worst < model_worst / 3
    total, _ = _rel(own, f32)
    assert total < 1.2 * model  # the products' rounding is lost in the model's
