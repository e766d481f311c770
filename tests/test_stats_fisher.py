"""Fisher and Gram statistics against independent computations (batch-size-1 autograd loops, explicit sums).

Batches are built by hand here (not by the data module): right-padded, answers of different lengths, labels −100
outside the answers, several images per sample or none.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_model, tiny_llava_model, tiny_qwen25vl_model
from safetensors import safe_open
from torch import nn

from forgetless.errors import ForgetlessError
from forgetless.stats.fisher import (
    accumulate_fisher,
    checkpoint_names,
    linear_modules,
    sample_answer_labels,
)
from forgetless.stats.gram import accumulate_gram, expected_shares, gram_memory

PAD = 0
LLAVA_IMG, LLAVA_TOKENS = 127, 16  # 32×32 image, 8×8 patches, CLS dropped
QWEN_IMG, QWEN_START, QWEN_END = 120, 122, 123


# ---------------------------------------------------------------------------------------------- samples
def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 110, (n,), generator=g).tolist()


def llama_samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, a) in enumerate([(5, 3), (9, 1), (3, 6), (7, 4), (4, 2)]):
        ids = [1] + _text(g, p) + _text(g, a)
        out.append({"ids": ids, "answer": a, "index": 100 + i})
    return out


def llava_samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n_img, p, a) in enumerate([(1, 4, 3), (0, 6, 2), (2, 3, 5), (1, 2, 1)]):
        ids = [1]
        for _ in range(n_img):
            ids += [LLAVA_IMG] * LLAVA_TOKENS + _text(g, 1)
        ids += _text(g, p) + _text(g, a)
        out.append(
            {
                "ids": ids,
                "answer": a,
                "index": i,
                "images": [torch.randn(3, 32, 32, generator=g) for _ in range(n_img)],
            }
        )
    return out


def qwen_samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (grids, p, a) in enumerate(
        [([(1, 4, 4)], 4, 3), ([(1, 4, 8), (1, 4, 4)], 3, 2), ([], 5, 4), ([(1, 8, 4)], 2, 6)]
    ):
        ids = [1]
        for t, h, w in grids:
            ids += [QWEN_START] + [QWEN_IMG] * (t * h * w // 4) + [QWEN_END]
        ids += _text(g, p) + _text(g, a)
        images = [(torch.randn(t * h * w, 96, generator=g), (t, h, w)) for t, h, w in grids]
        out.append({"ids": ids, "answer": a, "index": i, "images": images})
    return out


def collate(samples: list[dict], family: str) -> dict:
    """Right-padded batch of model kwargs + labels + sample_index."""
    T = max(len(s["ids"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["ids"])
        ids[b, :n] = torch.tensor(s["ids"])
        mask[b, :n] = 1
        labels[b, n - s["answer"] : n] = ids[b, n - s["answer"] : n]
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "sample_index": torch.tensor([s["index"] for s in samples]),
    }
    images = [im for s in samples for im in s.get("images", [])]
    if family == "llava" and images:
        batch["pixel_values"] = torch.stack(images)
    if family == "qwen" and images:
        batch["pixel_values"] = torch.cat([im for im, _ in images])
        batch["image_grid_thw"] = torch.tensor([thw for _, thw in images])
    return batch


# ---------------------------------------------------------------------------------------------- reference
def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the answer tokens of one sample (written out, not the module's helper)."""
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    tgt = labels[0, 1:]
    sel = tgt != -100
    return -logp[sel, tgt[sel]].mean()


def reference_fisher(
    model: nn.Module, samples: list[dict], family: str, names: list[str], sampled_seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch-size-1 loop: loss.backward per sample, grads squared and averaged. Keys: module parameter names."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for s in samples:
        batch = collate([s], family)
        labels = batch.pop("labels")
        idx = batch.pop("sample_index")
        model.zero_grad(set_to_none=True)
        logits = model(**batch, use_cache=False).logits
        if sampled_seed is not None:
            labels = sample_answer_labels(logits, labels, idx.tolist(), sampled_seed)
        answer_loss(logits, labels).backward()
        for n in names:
            acc[n] += params[n].grad.square() if params[n].grad is not None else 0
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return {n: a / len(samples) for n, a in acc.items()}


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} vs scale {scale:.3g} (rel {err / scale:.3g})"


MODELS = {
    "llama": (tiny_llama_model, llama_samples),
    "llava": (tiny_llava_model, llava_samples),
    "qwen": (tiny_qwen25vl_model, qwen_samples),
}


def scope(model: nn.Module, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """module name -> checkpoint name: every Linear weight and bias, plus the named extras."""
    to_ckpt = checkpoint_names(model)
    names = [
        f"{m}.{k}"
        for m, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        for k in ("weight", "bias")
        if getattr(mod, k) is not None
    ]
    return {n: to_ckpt[n] for n in names + list(extra)}


EXTRAS = {
    "llama": ("model.embed_tokens.weight", "model.norm.weight"),
    "llava": (
        "model.language_model.embed_tokens.weight",
        "model.vision_tower.post_layernorm.weight",
        "model.vision_tower.embeddings.patch_embedding.weight",
    ),
    "qwen": ("model.language_model.embed_tokens.weight", "model.visual.patch_embed.proj.weight"),
}


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", ["llama", "llava", "qwen"])
def test_checkpoint_names_are_the_names_save_pretrained_writes(family, tmp_path):
    model = MODELS[family][0]()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    mapping = checkpoint_names(model)
    assert set(mapping.values()) == saved
    assert len(mapping) == len(dict(model.named_parameters()))
    sd = model.state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for mod_name, ckpt in mapping.items():
            assert torch.equal(f.get_tensor(ckpt), sd[mod_name])


@pytest.mark.parametrize("family", ["llama", "llava", "qwen"])
def test_batched_fisher_equals_batch_size_one_loop(family):
    build, make = MODELS[family]
    model = build()
    samples = make()
    names = scope(model, EXTRAS[family])
    params = dict(model.named_parameters())
    batches = [collate(samples[:3], family), collate(samples[3:], family)]
    res = accumulate_fisher(model, batches, params={c: params[m] for m, c in names.items()})
    assert res.num_samples == len(samples) and res.skipped == []
    ref = reference_fisher(model, samples, family, list(names))
    nonzero = 0
    top = max(r.abs().max().item() for r in ref.values())
    for m, c in names.items():
        got = res.sums[c] / res.num_samples
        assert got.dtype == torch.float32
        if ref[m].abs().max() < 1e-12 * top:  # mathematically zero (a key bias under softmax): rounding noise
            assert got.abs().max() < 1e-12 * top, c
            continue
        assert_rel_close(got, ref[m], 1e-5, c)
        # F is non-zero exactly where some sample's gradient is (the published CGM code stored zeros)
        if ref[m].abs().max() > 0:
            nonzero += 1
            assert got.abs().max() > 0, c
            assert torch.equal(got != 0, ref[m] != 0) or ((got != 0) ^ (ref[m] != 0)).float().mean() < 1e-3, c
    assert nonzero >= len(names) // 2
    if family != "llama":  # the vision tower and projector are really covered
        for part in (
            "projector" if family == "llava" else "merger",
            "layers.0.self_attn" if family == "llava" else "blocks.0.attn",
        ):
            hit = [c for c in names.values() if part in c and c.endswith("weight")]
            assert hit and all(res.sums[c].abs().min() > 0 for c in hit), part
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_sampled_fisher_equals_its_batch_size_one_loop(family):
    build, make = MODELS[family]
    model = build()
    samples = make()
    names = scope(model)
    params = dict(model.named_parameters())
    res = accumulate_fisher(
        model,
        [collate(samples, family)],
        params={c: params[m] for m, c in names.items()},
        variant="sampled",
        seed=7,
    )
    ref = reference_fisher(model, samples, family, list(names), sampled_seed=7)
    emp = accumulate_fisher(
        model, [collate(samples, family)], params={c: params[m] for m, c in names.items()}
    )
    for m, c in names.items():
        assert_rel_close(res.sums[c] / res.num_samples, ref[m], 1e-5, c)
    lm = names["lm_head.weight"]
    assert not torch.allclose(res.sums[lm], emp.sums[lm])  # the labels really were drawn


def test_sampled_labels_follow_the_model_distribution_and_only_on_answers():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(1, 4000, 3).contiguous()
    labels = torch.full((1, 4000), -100)
    labels[0, 1000:] = 0
    drawn = sample_answer_labels(logits, labels, [3], seed=1)
    assert (drawn[0, :1000] == -100).all()
    freq = torch.bincount(drawn[0, 1000:], minlength=3).float() / 3000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    assert torch.equal(drawn, sample_answer_labels(logits, labels, [3], seed=1))
    assert not torch.equal(drawn, sample_answer_labels(logits, labels, [4], seed=1))


def test_shared_linear_called_twice_is_summed_before_squaring():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = None
            self.emb = nn.Embedding(16, 8)
            self.shared = nn.Linear(8, 8)
            self.head = nn.Linear(8, 16)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            h = torch.tanh(self.shared(h))
            h = torch.tanh(self.shared(h))
            return type("O", (), {"logits": self.head(h)})

    torch.manual_seed(0)
    model = Twice()
    ids = torch.randint(0, 16, (3, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    res = accumulate_fisher(
        model, [batch], params={"shared.weight": model.shared.weight, "shared.bias": model.shared.bias}
    )
    want = {"shared.weight": 0, "shared.bias": 0}
    for b in range(3):
        model.zero_grad()
        logits = model(ids[b : b + 1]).logits
        answer_loss(logits, labels[b : b + 1]).backward()
        want = {k: want[k] + getattr(model.shared, k.split(".")[1]).grad.square() for k in want}
    for k in want:
        assert_rel_close(res.sums[k], want[k], 1e-5, k)


def _nan_batch():
    model = tiny_llama_model()
    samples = llama_samples()[:3]
    batch = collate(samples, "llama")
    return model, batch


def test_nan_loss_is_an_error_naming_the_sample():
    model, batch = _nan_batch()
    with torch.no_grad():
        model.model.embed_tokens.weight[batch["input_ids"][1, 2]] = float("nan")
    # the token of sample 1 may also occur in others: find which samples are hit
    with pytest.raises(ForgetlessError, match=r"sample 10\d: non-finite"):
        accumulate_fisher(model, [batch])


def test_nan_is_a_counted_skip_and_never_a_silent_zero():
    model, batch = _nan_batch()
    tok = batch["input_ids"][1, 2].item()
    hit = [b for b in range(3) if (batch["input_ids"][b] == tok).any()]
    with torch.no_grad():
        model.model.embed_tokens.weight[tok] = float("nan")
    res = accumulate_fisher(model, [batch], on_bad="skip")
    assert [i for i, _ in res.skipped] == [100 + b for b in hit]
    assert res.num_samples == 3 - len(hit)
    clean = [b for b in range(3) if b not in hit]
    sub = {k: v[clean] for k, v in batch.items()}
    want = accumulate_fisher(model, [sub])
    for k, v in want.sums.items():
        assert torch.isfinite(res.sums[k]).all()
        assert_rel_close(res.sums[k], v, 1e-5, k)


def test_nan_gradient_with_finite_loss_is_subtracted_out_on_skip():
    """A gradient that is NaN while the loss is finite: caught in the backward hooks and removed."""
    model = tiny_llama_model()
    samples = llama_samples()[:3]
    batch = collate(samples, "llama")
    layer = model.model.layers[0].mlp.down_proj

    def poison(module, args, out):
        if out.requires_grad:
            out.register_hook(
                lambda g: torch.where(
                    torch.arange(g.shape[0])[:, None, None] == 1, torch.full_like(g, float("nan")), g
                )
            )

    h = layer.register_forward_hook(poison)
    try:
        res = accumulate_fisher(model, [batch], on_bad="skip")
        with pytest.raises(ForgetlessError, match="sample 101: non-finite gradient"):
            accumulate_fisher(model, [batch])
    finally:
        h.remove()
    assert [i for i, _ in res.skipped] == [101]
    want = accumulate_fisher(model, [collate([samples[0], samples[2]], "llama")])
    for k, v in want.sums.items():
        assert_rel_close(res.sums[k], v, 1e-5, k)


def test_sample_without_answer_tokens_is_skipped_and_not_counted():
    model = tiny_llama_model()
    samples = llama_samples()[:3]
    batch = collate(samples, "llama")
    batch["labels"][2] = -100
    seen = []
    res = accumulate_fisher(model, [batch], progress=seen.append, total=3)
    assert res.num_samples == 2 and res.skipped == [(102, "no answer tokens")]
    assert seen[-1].done == 3 and seen[-1].skipped == 1 and seen[-1].eta_s == 0 and seen[-1].per_s > 0


# ---------------------------------------------------------------------------------------------- Gram
@pytest.mark.parametrize("family", ["llama", "llava", "qwen"])
@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_gram_equals_explicit_sum_over_non_padding_tokens(family, tokens):
    build, make = MODELS[family]
    model = build()
    samples = make()
    linears = linear_modules(model)
    text = {id(m) for m in model.get_decoder().modules()} | {id(model.get_output_embeddings())}
    batches = [collate(samples[:2], family), collate(samples[2:], family)]
    res = accumulate_gram(model, batches, linears=linears, tokens=tokens)

    # independent: capture every input, keep the rows of real tokens, Σ x xᵀ in float64
    want = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    captured: list = []
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: captured.append((n, mod, a[0].detach())))
        for n, m in linears.items()
    ]
    try:
        for batch in batches:
            captured.clear()
            kw = {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}
            with torch.no_grad():
                model(**kw, use_cache=False)
            for n, mod, x in captured:
                if id(mod) in text:
                    sel = batch["attention_mask"] == 1
                    if tokens == "answer":
                        sel = batch["labels"] != -100
                    rows = x[sel]
                else:
                    rows = x.reshape(-1, x.shape[-1])
                rows = rows.double()
                for r in rows:
                    want[n] += torch.outer(r, r)
                counts[n] += rows.shape[0]
    finally:
        for h in hooks:
            h.remove()
    assert res.token_counts == counts
    for n in linears:  # a shared Gram is the Gram of every module that reads the input
        got = res.grams[res.shared.get(n, n)]
        assert got.dtype == torch.float64
        assert_rel_close(got, want[n], 1e-12, n)
    assert set(res.grams) == set(linears) - set(res.shared)
    # q/k/v and gate/up share, in the language model and the tower, as the names predict
    assert {n.split(".")[-2] for n in [*res.shared, *res.shared.values()]} >= {"k_proj", "v_proj", "up_proj"}
    assert res.shared == expected_shares(list(linears))
    assert gram_memory(linears, shared=res.shared) == sum(g.numel() * 8 for g in res.grams.values())
    if family != "llama":
        assert any(counts[n] > 0 and ("vision" in n or "visual" in n) for n in linears)


def test_gram_float32_matches_float64_in_half_the_memory():
    model = tiny_llama_model()
    batches = [collate(llama_samples(s), "llama") for s in range(3)]
    a = accumulate_gram(model, batches, dtype=torch.float64)
    b = accumulate_gram(model, batches, dtype=torch.float32)
    for n in a.grams:
        assert b.grams[n].dtype == torch.float32
        assert_rel_close(b.grams[n].double(), a.grams[n], 1e-6, n)
    assert a.token_counts == b.token_counts and a.shared == b.shared
    assert gram_memory(linear_modules(model), torch.float32) * 2 == gram_memory(linear_modules(model))


def test_unshared_gram_gives_every_module_its_own_equal_sum():
    model = tiny_llama_model()
    batches = [collate(llama_samples(s), "llama") for s in range(2)]
    shared = accumulate_gram(model, batches)
    alone = accumulate_gram(model, batches, share=False)
    assert alone.shared == {} and set(alone.grams) == set(linear_modules(model))
    for n, rep in shared.shared.items():
        assert torch.equal(alone.grams[n], alone.grams[rep]), n
        assert torch.equal(alone.grams[rep], shared.grams[rep]), rep


def test_tied_output_embedding_gets_the_gradient_of_both_uses():
    """With tie_word_embeddings, lm_head.weight *is* the input embedding: its per-sample gradient is the sum of the
    output-projection and the embedding-lookup parts (the benchmark on SmolLM2 found the lookup part dominates)."""
    from conftest import TEXT
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TEXT, "tie_word_embeddings": True})).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    samples = llama_samples()
    names = {
        "lm_head.weight": "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
    }
    params = dict(model.named_parameters(remove_duplicate=False))
    res = accumulate_fisher(
        model,
        [collate(samples[:3], "llama"), collate(samples[3:], "llama")],
        params={c: params[m] for m, c in names.items()},
    )
    ref = reference_fisher(
        model, samples, "llama", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    )
    assert_rel_close(
        res.sums["model.embed_tokens.weight"] / res.num_samples,
        ref["model.embed_tokens.weight"],
        1e-5,
        "tied embedding",
    )
    assert_rel_close(
        res.sums["model.layers.0.mlp.up_proj.weight"] / res.num_samples,
        ref["model.layers.0.mlp.up_proj.weight"],
        1e-5,
        "up_proj",
    )
