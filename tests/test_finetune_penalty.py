"""EWC and L2-SP in `forgetless finetune`: the penalty's gradient against its closed form λ F ⊙ (θ − θ₀), the
recorded penalty against λ/2 Σ F (θ − θ₀)², λ = 0 against plain fine-tuning bit for bit, and the refusals. LoRA:
the same on the folded update ΔW = s·B·A (gradients s·Bᵀ(λF⊙ΔW) and s·(λF⊙ΔW)·Aᵀ). FSDP2 on one process: the
plain run's weights. ``PenaltyCallback`` in a transformers Trainer: the closed form, and λ = 0 bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT, build_llama_with_tokenizer, save_statistics_for, write_qa_jsonl
from safetensors.torch import load_file, save_file

from forgetless.errors import ForgetlessError
from forgetless.stats.store import model_fingerprints
from forgetless.train import LoraSpec, finetune

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
        ({"keep": "spider", "lora": LoraSpec()}, "not to LoRA"),
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


# ------------------------------------------------------------------------------------------------ LoRA
LORA = LoraSpec(r=4, alpha=8.0, dropout=0.0)  # s = alpha / r = 2


def weight_of(key: str) -> str:
    """An adapter tensor's key → its base weight's checkpoint name (the Fisher's key)."""
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight"


def folded(params: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight name → (A, B) of its LoRA module."""
    return {
        weight_of(k): (params[k], params[k.replace("lora_A", "lora_B")]) for k in params if ".lora_A." in k
    }


def closed_form(a, b, f, lam, s=2.0):
    """(R, ∂R/∂A, ∂R/∂B) of R = λ/2 Σ F (s B A)², in float64."""
    a, b, f = a.double(), b.double(), f.double()
    delta = s * b @ a
    d = lam * f * delta
    return 0.5 * lam * float((f * delta**2).sum()), s * b.T @ d, s * d @ a.T


@pytest.mark.parametrize("keep", ["l2sp", "ewc"])
def test_lora_penalty_is_on_the_folded_update(setup, keep):
    """Step 1: B = 0, so ΔW = 0 and the gradients are the plain run's; step 2: the same weights, the gradients
    differing by the closed form; the recorded penalty λ/2 Σ F (s B A)² of the weights each step starts from."""
    root, _, _, fisher, _ = setup
    lam = 50.0
    extra = {"fisher": root / "fisher.safetensors"} if keep == "ewc" else {}
    plain, _ = run(setup, "lora-plain", lora=LORA)
    kept, report = run(setup, f"lora-{keep}", lora=LORA, keep=keep, strength=lam, **extra)
    assert sorted(folded(plain.grads[0])) == sorted(fisher)  # q_proj and v_proj of layer 1
    for k, g in plain.grads[0].items():
        assert torch.equal(kept.grads[0][k], g), k
    for k, w in plain.weights[1].items():
        assert torch.equal(kept.weights[1][k], w), k
    pairs = folded(kept.weights[1])
    for k in kept.grads[1]:
        if ".lora_A." not in k:
            continue
        weight, b_key = weight_of(k), k.replace("lora_A", "lora_B")
        f = fisher[weight] if keep == "ewc" else torch.ones(fisher[weight].shape)
        _, want_a, want_b = closed_form(*pairs[weight], f, lam)
        assert want_a.abs().max() > 1e-4 and want_b.abs().max() > 1e-4
        for key, want in ((k, want_a), (b_key, want_b)):
            got = (kept.grads[1][key] - plain.grads[1][key]).double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7 * want.abs().max().item())
    for step, weights in enumerate(kept.weights):
        want = sum(
            closed_form(a, b, fisher[w] if keep == "ewc" else torch.ones(fisher[w].shape), lam)[0]
            for w, (a, b) in folded(weights).items()
        )
        assert report.keep["penalty"][step] == pytest.approx(want, rel=1e-5, abs=1e-12)
    assert report.keep["penalty"][0] == 0.0 and report.keep["penalty"][1] > 0
    assert report.keep["lora_modules"] == 2
    assert report.keep["extra_bytes"] == (4 * sum(f.numel() for f in fisher.values()) if keep == "ewc" else 0)


def test_lora_strength_zero_is_plain_lora_bit_for_bit(setup):
    root = setup[0]
    run(setup, "lora-plain3", steps=3, lora=LORA)
    run(setup, "lora-ewc0", steps=3, lora=LORA, keep="ewc", strength=0.0, fisher=root / "fisher.safetensors")
    a, b = (load_file(str(root / d / "adapter_model.safetensors")) for d in ("lora-plain3", "lora-ewc0"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)


def test_a_continued_adapter_is_penalised_on_its_whole_update(setup):
    """With --init-adapter θ₀ is still the base: the first step's penalty is that of the adapter continued, read
    here from its written file."""
    root, _, _, fisher, _ = setup
    lam = 50.0
    run(setup, "lora-first", steps=2, lora=LORA, keep="ewc", strength=lam, fisher=root / "fisher.safetensors")
    written = load_file(str(root / "lora-first" / "adapter_model.safetensors"))
    _, report = run(
        setup,
        "lora-second",
        steps=1,
        lora=LORA,
        keep="ewc",
        strength=lam,
        fisher=root / "fisher.safetensors",
        init_adapter=root / "lora-first",
    )
    want = sum(closed_form(a, b, fisher[w], lam)[0] for w, (a, b) in folded(written).items())
    assert want > 0 and report.keep["penalty"][0] == pytest.approx(want, rel=1e-5)


def test_lora_needs_the_fisher_of_its_targets_weights(setup, tmp_path):
    """The Fisher is read for the targeted Linear weights only (the scope's other tensors need none); a target
    without one is refused before any work, by name."""
    root, model, data, fisher, _ = setup
    scope = ["re:layers\\.1\\.self_attn\\..*"]  # q, k, v, o; LoRA targets q and v
    kw = {"train": scope, "steps": 1, "device": "cpu", "log": None, "tensorboard": False, "keep": "ewc"}
    lora = LoraSpec(r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    report = finetune(
        model, data, tmp_path / "ok", lora=lora, strength=1.0, fisher=root / "fisher.safetensors", **kw
    )
    assert report.keep["lora_modules"] == 2
    q_only = save_statistics_for(
        model, tmp_path / "q.safetensors", {k: v for k, v in fisher.items() if "q_proj" in k}
    )
    with pytest.raises(ForgetlessError, match="no Fisher for 1 trained tensor.*v_proj") as e:
        finetune(model, data, tmp_path / "out", lora=lora, strength=1.0, fisher=q_only, **kw)
    assert "LoRA" in e.value.remedy and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_fsdp_on_one_process_gives_the_plain_runs_weights_and_penalty(setup, lora):
    """``fsdp=True`` without torchrun: the trainable tensors are DTensors over one rank (θ₀ and F their pieces, the
    penalty all-reduced), and the weights and penalty are the plain run's."""
    root = setup[0]
    kw = {"keep": "ewc", "strength": 50.0, "fisher": root / "fisher.safetensors", "lora": lora, "steps": 3}
    _, plain = run(setup, "fsdp-plain", **kw)
    _, sharded = run(setup, "fsdp-one", fsdp=True, **kw)
    assert sharded.keep["penalty"] == plain.keep["penalty"] and plain.keep["penalty"][-1] > 0
    assert sharded.losses == plain.losses and sharded.grad_norms == plain.grad_norms
    name = "model.safetensors" if lora is None else "adapter_model.safetensors"
    a, b = (load_file(str(root / d / name)) for d in ("fsdp-plain", "fsdp-one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ Trainer
def tiny_llama(lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**{**TEXT, "num_hidden_layers": 1}))
    if not lora:
        m.model.embed_tokens.requires_grad_(False)
        return m
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    m = get_peft_model(m, config)
    with torch.no_grad():  # B off zero, so that the first step's penalty is not zero
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return m


def fisher_for(model) -> dict[str, torch.Tensor]:
    """A random F for every weight the penalty covers, by checkpoint name."""
    g = torch.Generator().manual_seed(7)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if any("lora_A" in n for n in names):
        names = [weight_of(n) for n in names if "lora_A" in n]
        shapes = dict(model.get_base_model().named_parameters())
        names = {n: shapes[n.replace(".weight", ".base_layer.weight")].shape for n in names}
    else:
        names = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    return {n: torch.rand(shape, generator=g) * 10 for n, shape in names.items()}


def train_with_trainer(tmp_path, lora: bool, callbacks):
    from trainer_args import quiet_args
    from transformers import Trainer

    model = tiny_llama(lora)
    args = quiet_args(tmp_path / "trainer", steps=STEPS_T, lr=1e-2, batch=4, clip=0.5)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


STEPS_T = 3
IDS = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(5))


class Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(IDS)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": IDS[i], "labels": IDS[i]}


def penalty_in_the_loss(model, fisher, lam, theta0) -> torch.Tensor:
    """R by autograd's graph, independently of the callback's closed forms: λ/2 Σ F (θ − θ₀)², LoRA's θ − θ₀ the
    folded update s·B·A."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = torch.zeros(())
    for n, p in params.items():
        if "lora_B" in n:
            continue
        if "lora_A" in n:
            b = params[n.replace("lora_A", "lora_B")]
            total = total + (fisher[weight_of(n.replace(".default", ""))] * (2.0 * b @ p) ** 2).sum()
        else:
            total = total + (fisher[n] * (p - theta0[n]) ** 2).sum()
    return 0.5 * lam * total


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_penalty_callback_gives_the_penalised_loss_weights_and_zero_is_no_callback(tmp_path, lora):
    """The Trainer with ``PenaltyCallback("ewc")``: the weights of a plain loop whose loss holds R (autograd, clipped
    with the data's gradient); λ = 0: bit for bit the Trainer without the callback."""
    from forgetless.train import PenaltyCallback

    lam = 10.0
    fisher = fisher_for(tiny_llama(lora))
    callback = PenaltyCallback("ewc", strength=lam, fisher=fisher)
    got = train_with_trainer(tmp_path, lora, [callback])

    model = tiny_llama(lora).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    penalties = []
    for _ in range(STEPS_T):
        r = penalty_in_the_loss(model, fisher, lam, theta0)
        penalties.append(float(r))
        (model(input_ids=IDS, labels=IDS).loss + r).backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 0.5)
        opt.step()
        opt.zero_grad()
    for n, p in params.items():
        assert torch.allclose(got[n], p, rtol=0, atol=1e-6), n
    assert callback.penalty.history == pytest.approx(penalties, rel=1e-5)
    assert penalties[-1] > 0 and len(callback.penalty.lora) == (2 if lora else 0)

    plain = train_with_trainer(tmp_path, lora, [])
    zero = train_with_trainer(tmp_path, lora, [PenaltyCallback("ewc", strength=0.0, fisher=fisher)])
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    assert max((plain[n] - got[n]).abs().max().item() for n in params) > 1e-3  # the penalty mattered


def test_penalty_callback_refusals():
    from types import SimpleNamespace

    from forgetless.train import PenaltyCallback

    model = tiny_llama(False)
    fresh = SimpleNamespace(global_step=0)
    cases = [
        (SimpleNamespace(deepspeed="ds.json", fp16=False, fsdp=None), fresh, "DeepSpeed"),
        (SimpleNamespace(deepspeed=None, fp16=True, fsdp=None), fresh, "fp16"),
        (SimpleNamespace(deepspeed=None, fp16=False, fsdp="full_shard"), fresh, "FSDP2"),
        (SimpleNamespace(deepspeed=None, fp16=False, fsdp=None), SimpleNamespace(global_step=5), "resume"),
    ]
    for args, state, match in cases:
        with pytest.raises(ForgetlessError, match=match):
            PenaltyCallback("l2sp", strength=1.0).on_train_begin(args, state, None, model=model)
    with pytest.raises(ForgetlessError, match="EWC needs"):
        PenaltyCallback("ewc", strength=1.0)
    with pytest.raises(ForgetlessError, match="no Fisher for 1"):
        partial = dict(list(fisher_for(model).items())[1:])
        PenaltyCallback("ewc", strength=1.0, fisher=partial).on_train_begin(
            SimpleNamespace(deepspeed=None, fp16=False, fsdp=None), fresh, None, model=model
        )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_penalty_callback_keys_the_fisher_by_the_checkpoints_names(tmp_path, lora):
    """A LLaVA model is renamed in memory (``model.language_model.`` is ``language_model.model.`` on disk): the
    callback reads a Fisher keyed as `forgetless stats fisher` writes it, for the weights and for LoRA's targets."""
    from types import SimpleNamespace

    from conftest import build_tiny_llava
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from forgetless.train import PenaltyCallback

    model = AutoModelForImageTextToText.from_pretrained(build_tiny_llava(tmp_path / "llava"))
    model.requires_grad_(False)
    if lora:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        disk = load_file(str(tmp_path / "llava" / "model.safetensors"))
        keys = [k for k in disk if k.endswith("q_proj.weight")]
    else:
        for p in model.model.language_model.layers[0].mlp.parameters():
            p.requires_grad_(True)
        disk = load_file(str(tmp_path / "llava" / "model.safetensors"))
        keys = [k for k in disk if k.startswith("language_model.model.layers.0.mlp.")]
    fisher = {k: torch.rand(disk[k].shape) for k in keys}
    callback = PenaltyCallback("ewc", strength=1.0, fisher=fisher)
    args = SimpleNamespace(deepspeed=None, fp16=False, fsdp=None)
    callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    assert sorted(callback.penalty.fisher) == sorted(keys) and keys
    for k in keys:
        assert torch.equal(callback.penalty.fisher[k], fisher[k])


def test_dry_run_counts_the_penalty_memory(setup):
    """Full: θ₀ (as stored) and, for EWC, F in float32 per trained value; LoRA: F of the targeted weights (EWC),
    nothing for L2-SP (θ₀ is the base itself)."""
    from forgetless.checkpoint.writer import human_bytes

    root, model, data, fisher, weights = setup
    values = sum(f.numel() for f in fisher.values())
    stored = weights[next(iter(fisher))].element_size()
    ewc = {"keep": "ewc", "fisher": root / "fisher.safetensors"}
    cases = [
        ({**ewc}, values * (stored + 4)),
        ({"keep": "l2sp"}, values * stored),
        ({**ewc, "lora": LORA}, values * 4),
        ({"keep": "l2sp", "lora": LORA}, 0),
    ]
    for options, size in cases:
        lines: list[str] = []
        finetune(
            model, data, root / "dry", train=TRAIN, strength=1.0, dry_run=True, log=lines.append, **options
        )
        assert f"keep rule {human_bytes(size)}" in lines[0], (options, lines[0])
