"""Scoring a model on task splits: multiple choice by answer log-likelihood, free answers by greedy generation.

    result = evaluate("runs/merged", {"shapes": "runs/tasks/shapes"}, split="test", limit=200)
    result["tasks"]["shapes"]["accuracy"]

A record with ``options`` is scored as multiple choice: each option is put in the assistant's turn and scored by
the summed log-probability of exactly the tokens :class:`~forgetless.stats.data.Encoder` labels for an answer
(the option's tokens and the end-of-turn token); the prediction is the best option (ties: the first). That is
``acc``, the default; the same scores ranked as lm-evaluation-harness's ``acc_norm`` and lmms-eval's ``acc`` rank
them are reported beside it (:data:`forgetless.eval.metrics.MC_METRICS`, :meth:`OptionScores.predicted_by`). A
record without options is scored by exact match (whitespace-stripped, case-insensitive) of the greedily generated
answer.

Multiple choice is computed with one prompt pass per sample and one batched pass over all options' tokens that
reuses the prompt's KV cache, and the vocabulary projection is applied only where an answer token is predicted
(see :func:`score_options`). The result is the same as scoring every (question, option) sequence on its own.
Encoded items (and generation prompts) are remembered for the next model evaluated in the same process
(:mod:`.memo`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.reader import CheckpointReader
from ..errors import ForgetlessError
from ..safeload import read_json
from ..stats.data import IGNORE_INDEX, BadSample, Encoder, Sample, check_image, collate, load_samples
from ..stats.distributed import gather_objects, process_group
from .memo import Memo, sample_key
from .metrics import MC_METRICS

ENCODED = Memo()  # items and prompts encoded in this process, kept for the next model evaluated on them
KINDS = ("downstream", "general_visual", "general_text")
METRICS = ("mc", "exact")
TASK_ROOT_ENV = "FORGETLESS_TASKS"
DEFAULT_TASK_ROOT = "runs/tasks"
# config attributes that change the logits after lm_head: models that set them are scored the naive way
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier_scale",
)


# ----------------------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class TaskSpec:
    """One task split to evaluate: ``path`` is its JSONL file; ``kind`` one of :data:`KINDS` (``None``: not
    said); ``metric`` ``"mc"``/``"exact"`` as its ``task.json`` declares it (``None``: per record). A standard
    benchmark (:mod:`forgetless.eval.benchmarks`) has its name as ``benchmark`` and its folder as ``path``."""

    name: str
    path: Path
    kind: str | None = None
    metric: str | None = None
    benchmark: str | None = None


def _read_task_json(folder: Path) -> dict:
    f = folder / "task.json"
    if not f.is_file():
        return {}
    meta = read_json(f, remedy='task.json is {"name", "kind", "description", "metric"}', expect=dict)
    if meta.get("kind") is not None and meta["kind"] not in KINDS:
        raise ForgetlessError(
            f"unknown task kind {meta['kind']!r}", file=f, remedy=f"use one of {', '.join(KINDS)}"
        )
    if meta.get("metric") is not None and meta["metric"] not in METRICS:
        raise ForgetlessError(
            f"unknown metric {meta['metric']!r}", file=f, remedy=f"use one of {', '.join(METRICS)}"
        )
    return meta


def default_task_root() -> Path:
    """``$FORGETLESS_TASKS``, else ``runs/tasks`` (relative to the working folder)."""
    return Path(os.environ.get(TASK_ROOT_ENV) or DEFAULT_TASK_ROOT)


def resolve_task(
    spec: str | os.PathLike, *, split: str = "test", task_root: str | os.PathLike | None = None
) -> TaskSpec:
    """A task given as a JSONL file, a task folder (``<folder>/<split>.jsonl``, described by its ``task.json``),
    or a name looked up as ``<task_root>/<name>`` (default root: :func:`default_task_root`). A JSONL file whose
    folder has a ``task.json`` takes its name, kind and metric from it; otherwise its name is the file's stem."""
    p = Path(spec).expanduser()
    root = Path(task_root) if task_root is not None else default_task_root()
    if not p.exists() and not p.is_absolute() and (root / p).exists():
        p = root / p
    if p.is_file():
        meta = _read_task_json(p.parent)
        name = meta.get("name") or (p.parent.name if meta else p.stem)
        return TaskSpec(str(name), p, meta.get("kind"), meta.get("metric"))
    if p.is_dir():
        data = p / f"{split}.jsonl"
        if not data.is_file():
            have = sorted(f.stem for f in p.glob("*.jsonl"))
            raise ForgetlessError(
                f"the task folder has no {split}.jsonl (splits here: {', '.join(have) or 'none'})",
                file=p,
                remedy="pass --split with one of its splits, or a JSONL file",
            )
        meta = _read_task_json(p)
        return TaskSpec(str(meta.get("name") or p.name), data, meta.get("kind"), meta.get("metric"))
    raise ForgetlessError(
        f"task {str(spec)!r} not found: not a JSONL file, not a task folder, and no {root / p}",
        file=p,
        remedy=f"pass a JSONL file or a task folder, or set --task-root / ${TASK_ROOT_ENV}",
    )


# ----------------------------------------------------------------------------------------------------------------
# encoding


@dataclass
class _MCItem:
    """A multiple-choice sample encoded once per option: the shared prompt and each option's answer tokens."""

    prompt: dict[str, torch.Tensor]  # per-token tensors (1-D, the prompt only) and image tensors
    answers: list[torch.Tensor]  # labelled token ids of each option (answer + end-of-turn)
    tails: list[
        torch.Tensor
    ]  # each option's tokens after its labelled ones (ChatML: the newline after end-of-turn)
    full: list[
        dict[str, torch.Tensor]
    ]  # each option's whole encoding, labels on its answer and tail tokens only
    chars: list[int]  # each option's length in characters
    tail: bool  # whether the tails are scored (else they are empty)


def _sample_error(sample: Sample, problem: str) -> ForgetlessError:
    return ForgetlessError(
        f"sample {sample.id!r}: {problem}", file=sample.source, remedy="fix the sample in the task file"
    )


def _with_answer(sample: Sample, answer: str) -> Sample:
    """``sample`` with ``answer`` in its last assistant turn (appended when it has none)."""
    turns = list(sample.turns)
    last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        turns.append(("assistant", answer))
    else:
        turns[last] = ("assistant", answer)
    return dataclasses.replace(sample, turns=turns)


def _last_labelled_run(labels: torch.Tensor) -> tuple[int, int]:
    pos = (labels != IGNORE_INDEX).nonzero().flatten()
    b = int(pos[-1]) + 1
    a = b
    while a > 0 and labels[a - 1] != IGNORE_INDEX:
        a -= 1
    return a, b


def _encode(
    encoder: Encoder, sample: Sample, known: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    try:
        return encoder(sample, known)
    except BadSample as e:
        raise _sample_error(sample, e.reason) from None


def _encode_options(encoder: Encoder, sample: Sample, tail: bool = True) -> _MCItem:
    if not sample.options:
        raise _sample_error(sample, "no 'options' to score (multiple choice needs them)")
    answers, tails, full, prompt = [], [], [], None
    known: dict[str, torch.Tensor] = {}  # the options' shared prompt, tokenized once
    for j, option in enumerate(sample.options):
        enc = _encode(encoder, _with_answer(sample, option), known)
        ids, labels = enc["input_ids"], enc["labels"]
        a, b = _last_labelled_run(labels)
        if prompt is None:
            n = ids.shape[0]
            prompt = {
                k: (v[:a] if v.dim() == 1 and v.shape[0] == n else v)
                for k, v in enc.items()
                if k not in ("labels", "attention_mask")
            }
        elif not torch.equal(prompt["input_ids"], ids[:a]):
            raise _sample_error(
                sample,
                f"option {j} ({option!r}) changes the tokens before the answer, so the "
                "options do not share one prompt",
            )
        answers.append(ids[a:b].clone())
        end = len(ids) if tail else b
        tails.append(ids[b:end].clone())
        only = torch.full_like(labels, IGNORE_INDEX)
        only[a:end] = ids[a:end]
        full.append({**enc, **_shared_image(enc, prompt), "labels": only})
    assert prompt is not None
    return _MCItem(prompt, answers, tails, full, [len(o) for o in sample.options], tail)


def _shared_image(enc: dict[str, torch.Tensor], prompt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt's image tensors where an option's encoding holds equal ones: one copy per item, not per option."""
    return {
        k: prompt[k]
        for k, v in enc.items()
        if k in prompt and prompt[k] is not v and prompt[k].shape == v.shape and torch.equal(prompt[k], v)
    }


def _remembered_options(encoder: Encoder, sample: Sample, tail: bool) -> _MCItem:
    """:func:`_encode_options`, done once per process for encoders with one fingerprint (:mod:`.memo`)."""
    return ENCODED.get(
        sample_key(encoder, sample, "options", tail), lambda: _encode_options(encoder, sample, tail)
    )


def _remembered_prompt(encoder: Encoder, sample: Sample) -> dict[str, torch.Tensor]:
    """:func:`encode_prompt`, done once per process for encoders with one fingerprint (:mod:`.memo`)."""
    return ENCODED.get(sample_key(encoder, sample, "prompt"), lambda: encode_prompt(encoder, sample))


def encode_prompt(encoder: Encoder, sample: Sample) -> dict[str, torch.Tensor]:
    """The model inputs that ask for the sample's (last) answer: the conversation before its last assistant turn,
    rendered with the chat template's generation prompt, with the image. Per-token tensors are 1-D."""
    turns = list(sample.turns)
    while turns and turns[-1][0] == "assistant":
        turns.pop()
    if not turns:
        raise _sample_error(sample, "no question (the conversation has no user turn)")
    if sample.image is not None and encoder.processor is None:
        raise _sample_error(sample, "the sample has an image but the model has no image processor")
    try:
        image = encoder._open_image(Path(sample.image)) if sample.image is not None else None
        msgs = encoder._messages(dataclasses.replace(sample, turns=turns))
    except BadSample as e:
        raise _sample_error(sample, e.reason) from None
    enc = encoder._tokenize(encoder._render(msgs, True), image)
    n = enc["input_ids"].shape[-1]
    return {
        k: (v[0] if v.dim() == 2 and v.shape == (1, n) else v)
        for k, v in enc.items()
        if isinstance(v, torch.Tensor)
    }


def _left_pad(
    rows: Sequence[dict[str, torch.Tensor]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A left-padded batch with an ``attention_mask``; image tensors concatenated in row order."""
    lengths = [r["input_ids"].shape[0] for r in rows]
    width = max(lengths)
    batch: dict[str, torch.Tensor] = {}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for key in keys:
        if all(key in r and r[key].dim() == 1 and r[key].shape[0] == n for r, n in zip(rows, lengths)):
            out = torch.full(
                (len(rows), width), pad_id if key == "input_ids" else 0, dtype=rows[0][key].dtype
            )
            for i, (r, n) in enumerate(zip(rows, lengths)):
                out[i, width - n :] = r[key]
            batch[key] = out
        else:
            batch[key] = torch.cat([r[key] for r in rows if key in r], dim=0)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    batch["attention_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------------
# multiple choice


@dataclass
class OptionScores:
    """One sample's options: ``logprobs[j]`` is the summed log-probability of option j's answer tokens
    (``num_tokens[j]`` of them, end-of-turn included); ``num_chars[j]`` the option's length in characters;
    ``tail_logprobs[j]`` the summed log-probability of the ``tail_tokens[j]`` tokens the chat template renders after
    them to the end of the conversation (ChatML: the newline after ``<|im_end|>``), which lmms-eval scores too.

    ``predicted`` is the argmax of ``logprobs`` (``acc``); :meth:`predicted_by` ranks by any of
    :data:`~forgetless.eval.metrics.MC_METRICS` (ties: the lowest index, as numpy's argmax/argmin in both harnesses).
    """

    logprobs: list[float]
    num_tokens: list[int]
    num_chars: list[int] | None = None
    tail_logprobs: list[float] | None = None
    tail_tokens: list[int] | None = None

    def values(self, metric: str = "acc") -> list[float]:
        """What ``metric`` ranks the options by (the highest wins): ``acc`` the summed log-probability;
        ``acc_norm`` that divided by the option's length in characters (lm-evaluation-harness: ``lls /
        completion_len``, ``len`` of the option string); ``lmms_eval_acc`` the mean log-probability per token
        over the answer, end-of-turn and tail tokens — minus the loss lmms-eval ranks by (``argmin``)."""
        if metric == "acc":
            return list(self.logprobs)
        if metric == "acc_norm" and self.num_chars is not None:
            return [lp / n for lp, n in zip(self.logprobs, self.num_chars)]
        if metric == "lmms_eval_acc" and self.tail_logprobs is not None and self.tail_tokens is not None:
            return [
                (lp + tl) / (n + tn)
                for lp, n, tl, tn in zip(self.logprobs, self.num_tokens, self.tail_logprobs, self.tail_tokens)
            ]
        known = metric in MC_METRICS
        raise ForgetlessError(
            f"multiple-choice metric {metric!r} "
            + ("needs scores this object lacks" if known else "is unknown"),
            remedy=f"use one of {', '.join(MC_METRICS)}",
        )

    def predicted_by(self, metric: str = "acc") -> int:
        v = self.values(metric)
        return v.index(max(v))

    @property
    def predicted(self) -> int:
        return self.predicted_by("acc")


def _fast_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, bool] | None:
    """``(base model, lm_head, 3-D rope)`` when the fast path applies: the model is ``<base> → lm_head`` with
    nothing in between (transformers' ``*ForCausalLM`` / ``*ForConditionalGeneration``), else ``None``."""
    base, head = getattr(model, "model", None), model.get_output_embeddings()
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for c in {id(cfg): cfg, id(model.config): model.config}.values():
        for attr in _LOGIT_TRANSFORMS:
            v = getattr(c, attr, None)
            if v is not None and v != 1 and v != 1.0:
                return None
    mrope = hasattr(base, "get_rope_index")
    if mrope and "mm_token_type_ids" not in inspect.signature(base.get_rope_index).parameters:
        return None  # another generation of 3-D rope models: not supported by the fast path
    return base, head, mrope


def score_options(
    model: torch.nn.Module,
    encoder: Encoder,
    samples: Sequence[Sample],
    batch_size: int = 8,
    *,
    naive: bool = False,
    tail: bool = True,
) -> list[OptionScores]:
    """Score every option of every sample (samples need ``options``): the summed log-probability of the
    option's answer tokens (exactly the tokens the Encoder labels: the answer and the end-of-turn token), given
    the prompt (the common prefix of the encoded (question, option) sequences, checked identical across options),
    and, with ``tail``, of the tokens the template renders after them (:class:`OptionScores`; what
    ``lmms_eval_acc`` needs: one more token per option, +15% matrix products on the testbed's tasks).

    Fast path, for ``<base model> → lm_head`` models (Llama-style causal LMs, LLaVA, Qwen2.5-VL): ``batch_size``
    prompts run once, left-padded, with position ids from the attention mask (Qwen2.5-VL: its 3-D rope positions
    from ``get_rope_index``, text positions after the prompt offset by the row's rope delta) and images; the KV
    cache is then repeated per option and all options' tokens (right-padded) run in one forward. ``lm_head`` is
    applied only to the hidden states that predict an option's token: the prompt's last position (first answer
    token) and each option position but the last. Other models (e.g. with logit soft-capping), or
    ``naive=True``, take the naive path: each (question, option) sequence as a whole, full logits.
    Call under ``torch.no_grad()`` with the model in eval mode (as :func:`evaluate` does).
    """
    if batch_size < 1:
        raise ForgetlessError(
            f"batch size must be ≥ 1, got {batch_size}", remedy="pass a positive batch size"
        )
    parts = None if naive else _fast_parts(model)
    out: list[OptionScores] = []
    for i in range(0, len(samples), batch_size):
        items = [_remembered_options(encoder, s, tail) for s in samples[i : i + batch_size]]
        out.extend(
            _score_fast(items, encoder, parts) if parts is not None else _score_naive(model, items, encoder)
        )
    return out


def _score_naive(model: torch.nn.Module, items: list[_MCItem], encoder: Encoder) -> list[OptionScores]:
    rows = [enc for it in items for enc in it.full]
    batch = collate(rows, encoder.pad_token_id)
    dev = _device(model)
    labels = batch.pop("labels").to(dev)
    batch.pop("sample_index")
    logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits[:, :-1].float()
    target = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
    scored = target != IGNORE_INDEX  # each row: its answer tokens, then its tail
    n_answer = torch.tensor([len(a) for it in items for a in it.answers], device=dev)[:, None]
    in_answer = scored & (scored.cumsum(1) <= n_answer)
    return _per_item(items, (lp * in_answer).sum(1).tolist(), (lp * (scored & ~in_answer)).sum(1).tolist())


def _per_item(items: list[_MCItem], answer: list[float], tail: list[float]) -> list[OptionScores]:
    """The flat per-option sums over answer and tail tokens (items' options in order) regrouped per item."""
    res, k0 = [], 0
    for it in items:
        k = len(it.answers)
        res.append(
            OptionScores(
                answer[k0 : k0 + k],
                [len(a) for a in it.answers],
                list(it.chars),
                tail[k0 : k0 + k] if it.tail else None,
                [len(t) for t in it.tails] if it.tail else None,
            )
        )
        k0 += k
    return res


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes a KV cache by: ``cache`` where it has one (transformers ≥ 5.24, which
    deprecates ``past_key_values`` and removes it in 5.40), else ``past_key_values`` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned: ``output.cache`` (transformers ≥ 5.24), else
    ``output.past_key_values`` (read only where ``cache`` is absent: it is deprecated where both exist)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _score_fast(
    items: list[_MCItem], encoder: Encoder, parts: tuple[torch.nn.Module, torch.nn.Module, bool]
) -> list[OptionScores]:
    sums = option_sums(items, encoder.pad_token_id, parts)
    return _per_item(items, sums[0].tolist(), sums[1].tolist())


def option_sums(
    items: list[_MCItem], pad: int, parts: tuple[torch.nn.Module, torch.nn.Module, bool]
) -> torch.Tensor:
    """The fast path of :func:`score_options` (`parts`: :func:`_fast_parts`): per option of every item, in order,
    the summed log-probability of its answer tokens (row 0) and of its tail (row 1); differentiable in the
    model's weights (``forgetless learn`` trains through it)."""
    base, head, mrope = parts
    dev = _device(head)
    batch = _left_pad([it.prompt for it in items], pad, dev)
    mask = batch["attention_mask"]
    lengths = mask.sum(-1)  # real prompt lengths
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    delta = torch.zeros(len(items), 1, dtype=torch.long, device=dev)
    if mrope:
        mm = batch.get("mm_token_type_ids")
        if mm is None:
            image_id = getattr(base.config, "image_token_id", None)
            mm = (batch["input_ids"] == image_id).long() if image_id is not None else torch.zeros_like(mask)
        pos, delta = base.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=mm,
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=mask,
        )
        delta = delta.to(dev).long().view(len(items), 1)
    first = base(**batch, position_ids=pos, use_cache=True)
    cache = output_cache(first)
    lp_first = torch.log_softmax(head(first.last_hidden_state[:, -1]).float(), -1)  # [B, V]

    # one row per option: its answer tokens, then its tail
    row_item = torch.tensor([i for i, it in enumerate(items) for _ in it.answers], device=dev)
    seqs = [torch.cat([a, t]).to(dev) for it in items for a, t in zip(it.answers, it.tails)]
    n_answer = torch.tensor([len(a) for it in items for a in it.answers], device=dev)
    first_token = lp_first[row_item, torch.stack([s[0] for s in seqs])]
    # per option: the sum over its answer tokens, the sum over its tail
    sums = torch.stack([first_token, torch.zeros_like(first_token)])
    width = max(len(s) for s in seqs) - 1
    if width > 0:
        ids = torch.full((len(seqs), width + 1), pad, dtype=torch.long, device=dev)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
        n_in = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        opt_mask = (torch.arange(width, device=dev)[None] < n_in[:, None]).long()
        cache.batch_select_indices(row_item)  # the prompt's keys and values, once per option
        opt_pos = lengths[row_item, None] + torch.arange(width, device=dev)[None]
        if mrope:
            opt_pos = (opt_pos + delta[row_item])[None].expand(3, -1, -1)
        hidden = base(
            input_ids=ids[:, :width],
            attention_mask=torch.cat([mask[row_item], opt_mask], 1),
            position_ids=opt_pos,
            use_cache=True,
            **{cache_keyword(base): cache},
        ).last_hidden_state
        r, t = opt_mask.nonzero(as_tuple=True)
        lp = torch.log_softmax(head(hidden[r, t]).float(), -1).gather(-1, ids[r, t + 1][:, None])[:, 0]
        in_tail = (t + 1 >= n_answer[r]).long()  # position t predicts token t + 1
        sums = sums.reshape(-1).index_add(0, in_tail * len(seqs) + r, lp).view(2, -1)
    return sums


# ----------------------------------------------------------------------------------------------------------------
# generation


def stop_token_ids(model: torch.nn.Module, encoder: Encoder) -> list[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's end-of-sequence tokens, and the
    end-of-turn token the chat template puts after an assistant answer (when it is a special token)."""
    ids: list[int] = []

    def add(t: Any) -> None:
        for x in t if isinstance(t, (list, tuple)) else [t]:
            if x is not None and int(x) not in ids:
                ids.append(int(x))

    add(encoder.tokenizer.eos_token_id)
    gc = getattr(model, "generation_config", None)
    add(getattr(gc, "eos_token_id", None))
    try:
        enc = encoder(Sample("probe", None, [("user", "Hi"), ("assistant", "OK")]))
        last = int(enc["input_ids"][_last_labelled_run(enc["labels"])[1] - 1])
        if last in set(encoder.tokenizer.all_special_ids):
            add(last)
    except (BadSample, ForgetlessError):
        pass
    return ids


def generate_answers(
    model: torch.nn.Module,
    encoder: Encoder,
    samples: Sequence[Sample],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers: each sample's prompt (:func:`encode_prompt`), ``batch_size`` at a time left-padded, through
    ``model.generate`` (no sampling, one beam) for at most ``max_new_tokens`` new tokens; the new tokens up to the
    first stop token (:func:`stop_token_ids`) are decoded without special tokens and stripped."""
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ForgetlessError(
            f"batch size must be ≥ 1, got {batch_size}", remedy="pass a positive batch size"
        )
    stops = stop_token_ids(model, encoder)
    pad = encoder.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    dev = _device(model)
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        batch = _left_pad([_remembered_prompt(encoder, s) for s in samples[i : i + batch_size]], pad, dev)
        width = batch["input_ids"].shape[1]
        seqs = model.generate(**batch, generation_config=config)
        for row in seqs[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            answers.append(encoder.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def exact_match(prediction: str, answer: str) -> bool:
    """Equal after stripping surrounding whitespace, ignoring case."""
    return prediction.strip().casefold() == answer.strip().casefold()


def _answer(sample: Sample) -> str:
    return next(text for role, text in reversed(sample.turns) if role == "assistant")


def item_fingerprints(samples: Sequence[Sample]) -> list[str]:
    """Per item, 12 hex digits of the sha256 of what is asked and expected (its turns, options and image file
    name): two results compared item by item must have been scored on the same items, not only on tasks of the
    same name and size."""
    out = []
    for s in samples:
        what = [s.turns, s.options, None if s.image is None else Path(s.image).name]
        out.append(hashlib.sha256(json.dumps(what, ensure_ascii=False).encode("utf-8")).hexdigest()[:12])
    return out


def task_fingerprints(spec: TaskSpec, limit: int | None) -> list[str]:
    """The item fingerprints a task's evaluation will record (its records checked as :func:`evaluate` checks them;
    a benchmark's: one per unit)."""
    from .benchmarks import unit_fingerprints

    samples = _load_task(spec, limit)
    if spec.benchmark is not None:
        return unit_fingerprints(samples, item_fingerprints(samples))  # type: ignore[arg-type]
    return item_fingerprints(samples)


def benchmark_spec(name: str, folder: str | os.PathLike) -> TaskSpec:
    """The task of the standard benchmark ``name`` read from ``folder`` (checked to exist)."""
    from . import benchmarks

    bench = benchmarks.get(name)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ForgetlessError(
            f"the {name} benchmark folder does not exist",
            file=folder,
            remedy="pass --benchmark-dir the folder holding the benchmark's files",
        )
    return TaskSpec(bench.name, folder, "general_visual", "exact", bench.name)


def _read_benchmark(spec: TaskSpec, limit: int | None) -> list[Sample]:
    """A benchmark's items (:mod:`.benchmarks`); with ``limit``, those of its first ``limit`` units."""
    from .benchmarks import get, units_in_order

    assert spec.benchmark is not None
    items = get(spec.benchmark).read(spec.path)
    if not items:
        raise ForgetlessError(
            f"no {spec.benchmark} questions found", file=spec.path, remedy="check the benchmark folder"
        )
    if limit is not None:
        keep = set(units_in_order(items)[:limit])
        items = [it for it in items if it.unit in keep]
    return list(items)


def _load_task(spec: TaskSpec, limit: int | None) -> list[Sample]:
    if spec.benchmark is not None:
        samples = _read_benchmark(spec, limit)
    else:
        samples = load_samples(spec.path, shuffle=False)
        samples = samples if limit is None else samples[:limit]
    for s in samples:
        if not any(role == "assistant" for role, _ in s.turns):
            raise _sample_error(s, "no answer to compare with")
        if spec.metric == "mc" and not s.options:
            raise _sample_error(
                s, "the task's metric is multiple choice (task.json) but the record has no 'options'"
            )
        if s.image is not None:
            try:  # missing, unreadable or a decompression bomb: named before the model is loaded
                check_image(s.image)
            except BadSample as e:
                raise _sample_error(s, e.reason) from None
    return samples


class _Progress:
    """Samples done, samples/s and ETA over the whole evaluation, at most every ``every`` seconds."""

    def __init__(self, total: int, log: Callable[[str], None] | None, every: float = 5.0, scale: int = 1):
        self.total, self.log, self.every, self.scale = total, log, every, scale
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def __call__(self, task: str, n: int, task_done: int, task_total: int) -> None:
        """``n`` more done (this rank's, counted ``scale`` times: each rank does its share)."""
        self.done += n * self.scale
        now = time.perf_counter()
        if self.log is None or (now - self.last < self.every and task_done < task_total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.log(
            f"  {task}: {task_done}/{task_total} · all {self.done}/{self.total} · {rate:.1f} samples/s · "
            f"ETA {_duration(eta)}"
        )


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _infer_kind(spec: TaskSpec, samples: list[Sample], group: str) -> str:
    if group == "downstream":
        return "downstream"
    if spec.kind in ("general_visual", "general_text"):
        return spec.kind
    return "general_visual" if any(s.image is not None for s in samples) else "general_text"


def shard_by_length(samples: Sequence[Sample], rank: int, world: int) -> list[int]:
    """This rank's item indices, in file order: the longest items first onto the least-loaded rank (length: the
    characters of the turns and the options), so the ranks' shares cost about the same; all of them in one
    process."""
    if world == 1:
        return list(range(len(samples)))
    cost = [sum(len(text) for _role, text in s.turns) + sum(len(o) for o in s.options or []) for s in samples]
    load, owner = [0] * world, [0] * len(samples)
    for i in sorted(range(len(samples)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + cost[i] + 1
    return [i for i in range(len(samples)) if owner[i] == rank]


def _gathered(own: list[dict[str, Any]], mine: list[int], n: int) -> list[dict[str, Any]]:
    """Every rank's predictions, back in file order (each rank gets them all)."""
    ordered: list[dict[str, Any] | None] = [None] * n
    for indices, preds in gather_objects((mine, own)):
        for i, p in zip(indices, preds):
            ordered[i] = p
    return ordered


def _predict(
    model: torch.nn.Module,
    encoder: Encoder,
    samples: list[Sample],
    spec: TaskSpec,
    extra: list[str],
    batch_size: int,
    max_new_tokens: int,
    meter: _Progress,
) -> list[dict[str, Any]]:
    """One prediction per sample, in order: options scored by log-likelihood (multiple choice, unless the task's
    metric is exact match), else a greedy answer."""
    by_mc = spec.metric != "exact"
    mc = [s for s in samples if s.options and by_mc]
    free = [s for s in samples if not (s.options and by_mc)]
    preds: dict[int, dict[str, Any]] = {}
    done = 0
    for i in range(0, len(mc), batch_size):
        chunk = mc[i : i + batch_size]
        scored = score_options(model, encoder, chunk, batch_size, tail="lmms_eval_acc" in extra)
        for s, sc in zip(chunk, scored):
            preds[id(s)] = _mc_prediction(s, sc, extra)
        done += len(chunk)
        meter(spec.name, len(chunk), done, len(samples))
    for i in range(0, len(free), batch_size):
        chunk = free[i : i + batch_size]
        for s, text in zip(chunk, generate_answers(model, encoder, chunk, max_new_tokens, batch_size)):
            answer = _answer(s)
            preds[id(s)] = {
                "id": s.id,
                "answer": answer,
                "prediction": text,
                "correct": exact_match(text, answer),
            }
        done += len(chunk)
        meter(spec.name, len(chunk), done, len(samples))
    return [preds[id(s)] for s in samples]


def _mc_prediction(s: Sample, sc: OptionScores, extra: list[str]) -> dict[str, Any]:
    assert s.options is not None
    answer, guess = _answer(s), s.options[sc.predicted]
    pred = {
        "id": s.id,
        "answer": answer,
        "prediction": guess,
        "predicted_index": sc.predicted,
        "logprobs": sc.logprobs,
        "num_tokens": sc.num_tokens,
        "correct": guess == answer,
    }
    if "lmms_eval_acc" in extra:
        pred["lmms_eval_loss"] = [-v for v in sc.values("lmms_eval_acc")]
    for m in extra:
        j = sc.predicted_by(m)
        pred[m] = {"predicted_index": j, "correct": s.options[j] == answer}
    return pred


def _task_entry(
    spec: TaskSpec,
    samples: list[Sample],
    group: str,
    ordered: list[dict[str, Any]],
    extra: list[str],
    keep_predictions: bool,
) -> dict[str, Any]:
    """A task's result: accuracy, per-item correctness and fingerprints, the other metrics, the predictions."""
    from .metrics import correct_items

    has_mc = any("predicted_index" in p for p in ordered)
    has_free = any("predicted_index" not in p for p in ordered)
    correct = sum(p["correct"] for p in ordered)
    entry: dict[str, Any] = {
        "kind": _infer_kind(spec, samples, group),
        "path": str(spec.path),
        "metric": "mc" if not has_free else "exact" if not has_mc else "mixed",
        "n": len(samples),
        "correct": correct,
        "accuracy": correct / len(samples),
        "correct_items": correct_items([p["correct"] for p in ordered]),
        "item_fingerprints": item_fingerprints(samples),
    }
    for m in extra if has_mc else ():  # an exact-match record is right or wrong for every metric
        flags = [p[m]["correct"] if m in p else p["correct"] for p in ordered]
        entry[m] = {
            "correct": sum(flags),
            "accuracy": sum(flags) / len(samples),
            "correct_items": correct_items(flags),
        }
    if keep_predictions:
        entry["predictions"] = ordered
    return entry


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation reads its tasks and runs the model: each task's ``split`` and its first ``limit`` records,
    names looked up under ``task_root``; batches of ``batch_size``, at most ``max_new_tokens`` per generated
    answer (``None``: 32, and a benchmark's own length); the model in ``dtype`` on ``device`` (``auto``: CUDA when present); a dynamic-resolution processor's
    image bounds ``min_pixels`` / ``max_pixels``. :func:`evaluate` and ``run_eval`` take it whole or field by
    field as keyword arguments."""

    split: str = "test"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    task_root: str | os.PathLike | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def of(cls, options: EvalOptions | None = None, **fields: Any) -> EvalOptions:
        """``options`` (default: the defaults) with the keyword ``fields`` put in; an unknown name is a
        TypeError, as for any keyword argument."""
        return dataclasses.replace(options or cls(), **fields)


def evaluate(
    model_dir: str | os.PathLike,
    tasks: Mapping[str, str | os.PathLike | TaskSpec],
    *,
    general: Mapping[str, str | os.PathLike | TaskSpec] | None = None,
    options: EvalOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    keep_predictions: bool = True,
    metrics: Sequence[str] = MC_METRICS,
    **fields: Any,
) -> dict[str, Any]:
    """Evaluate the model folder on each task; returns the result dict (what ``forgetless eval`` writes).

    ``tasks`` (downstream) and ``general`` map a name to a JSONL file, a task folder (its ``<split>.jsonl``) or a
    task name under ``task_root`` (see :func:`resolve_task`), or to a :class:`TaskSpec`. Every task in ``tasks``
    is ``downstream``; a ``general`` task is ``general_visual`` or ``general_text`` as its ``task.json`` says,
    else ``general_visual`` when one of its samples has an image. A record with ``options`` is scored as multiple
    choice (unless its ``task.json`` metric is ``exact``), else by exact match of the greedy answer. ``options``
    (:class:`EvalOptions`; its fields may be given as keywords instead, ``split="val", limit=200``) says which
    split, how many records (file order) and how the model runs.

    Everything is checked (tasks, records, images) before the model is loaded, once, in eval mode under
    ``torch.no_grad``. Under torchrun each rank scores its share of every task's items (:func:`shard_by_length`)
    and every rank returns the whole result, gathered. Per task: ``accuracy`` (correct / n, a fraction), ``n``,
    ``correct``, ``metric`` (``mc``, ``exact`` or ``mixed``) and, with ``keep_predictions``, per-sample
    ``predictions``; always ``correct_items``, the per-item correctness as a string of ``0``/``1``
    (what the bootstrap intervals resample, :mod:`forgetless.eval.metrics`). ``scores`` holds T, G_v, G_t and G
    (:func:`forgetless.eval.metrics.scores`). These are ``acc``; a task with multiple-choice records also has
    the other ``metrics`` of :data:`forgetless.eval.metrics.MC_METRICS` (``acc_norm``; ``lmms_eval_acc``, which
    scores one more token per option) as ``{"accuracy", "correct", "correct_items"}`` (exact-match records counted
    as in ``acc``), and so has the result (``{"scores"}``).
    """
    model_dir = Path(model_dir)
    o = EvalOptions.of(options, **fields)
    extra = _check_request(model_dir, o.limit, metrics)
    loaded = _load_tasks(tasks, general, o)
    encoder = Encoder(model_dir, min_pixels=o.min_pixels, max_pixels=o.max_pixels)
    for spec, samples, _ in loaded:
        if encoder.processor is None and any(s.image is not None for s in samples):
            raise ForgetlessError(
                f"task {spec.name!r} has images but the model has no image processor",
                file=spec.path,
                remedy="evaluate a multimodal model (with processor files)",
            )
    t0 = time.perf_counter()
    say = log if progress else None
    results, official = _score_tasks(
        model_dir, loaded, encoder, extra, o, keep_predictions=keep_predictions, say=say
    )
    seconds = time.perf_counter() - t0
    total = sum(len(s) for _, s, _ in loaded)
    pixels = {"pixels": [o.min_pixels, o.max_pixels]} if o.min_pixels or o.max_pixels else {}
    out = {
        "model": str(model_dir),
        "split": o.split,
        "limit": o.limit,
        "dtype": o.dtype,
        **pixels,
        "tasks": results,
        **({"benchmarks": official} if official else {}),
        "seconds": round(seconds, 3),
        "samples_per_s": round(total / seconds, 3) if seconds else None,
    }
    return _with_scores(out, extra)


def _check_request(model_dir: Path, limit: int | None, metrics: Sequence[str]) -> list[str]:
    """The refusals that need no task file; returns the metrics asked beside ``acc``."""
    if not (model_dir / "config.json").is_file():
        raise ForgetlessError(
            "not a model folder (no config.json)", file=model_dir, remedy="pass a Hugging Face model folder"
        )
    with CheckpointReader(model_dir):  # a damaged or missing weight file is named before any work
        pass
    if limit is not None and limit < 1:
        raise ForgetlessError(f"--limit must be ≥ 1, got {limit}", remedy="pass a positive limit or none")
    if set(metrics) - set(MC_METRICS):
        raise ForgetlessError(
            f"unknown metrics {sorted(set(metrics) - set(MC_METRICS))}",
            remedy=f"use some of {', '.join(MC_METRICS)}",
        )
    return [m for m in MC_METRICS[1:] if m in metrics]


def _load_tasks(
    tasks: Mapping[str, Any], general: Mapping[str, Any] | None, o: EvalOptions
) -> list[tuple[TaskSpec, list[Sample], str]]:
    """(spec, samples, group) of every task, downstream first; names unique, at least one task."""
    specs: list[tuple[TaskSpec, str]] = []
    for group_tasks, group in ((tasks, "downstream"), (general or {}, "general")):
        for name, t in group_tasks.items():
            spec = t if isinstance(t, TaskSpec) else resolve_task(t, split=o.split, task_root=o.task_root)
            specs.append((dataclasses.replace(spec, name=name), group))
    names = [s.name for s, _ in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ForgetlessError(f"task names given twice: {', '.join(dup)}", remedy="give each task once")
    if not specs:
        raise ForgetlessError("no tasks to evaluate", remedy="pass --tasks and/or --general")
    return [(spec, _load_task(spec, o.limit), group) for spec, group in specs]


def _score_tasks(
    model_dir: Path,
    loaded: list[tuple[TaskSpec, list[Sample], str]],
    encoder: Encoder,
    extra: list[str],
    o: EvalOptions,
    *,
    keep_predictions: bool,
    say: Callable[[str], None] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every task's entry, and each benchmark's official figures: the model loaded once; under torchrun each rank
    scores its share, gathered."""
    from ..cpm import load_model
    from ..stats.run import resolve_device

    total = sum(len(s) for _, s, _ in loaded)
    dev = resolve_device(o.device)
    results: dict[str, Any] = {}
    official: dict[str, Any] = {}
    with process_group(dev) as (rank, world):
        say = say if rank == 0 else None
        model = load_model(model_dir, dtype=o.dtype, device=str(dev))  # with its routing if CPM-routed
        if say:
            ranks = f", {world} processes" if world > 1 else ""
            say(f"evaluating {model_dir} on {len(loaded)} task(s), {total} samples ({dev}, {o.dtype}{ranks})")
        meter = _Progress(total, say, scale=world)
        with torch.no_grad():
            for spec, samples, group in loaded:
                mine = shard_by_length(samples, rank, world)
                part = [samples[i] for i in mine]
                own = _predict(model, encoder, part, spec, extra, o.batch_size, _new_tokens(spec, o), meter)
                ordered = _gathered(own, mine, len(samples))
                if spec.benchmark is not None:
                    results[spec.name], official[spec.name] = _benchmark_entry(
                        spec, samples, ordered, keep_predictions
                    )
                else:
                    results[spec.name] = _task_entry(spec, samples, group, ordered, extra, keep_predictions)
    return results, official


def _new_tokens(spec: TaskSpec, o: EvalOptions) -> int:
    """The longest answer generated for ``spec``: the option's, else a benchmark's own, else 32."""
    from .benchmarks import get

    if o.max_new_tokens is not None:
        return o.max_new_tokens
    return get(spec.benchmark).max_new_tokens if spec.benchmark is not None else 32


def _benchmark_entry(
    spec: TaskSpec, samples: list[Sample], ordered: list[dict[str, Any]], keep: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A benchmark's task entry and official figures, from its generated answers."""
    from .benchmarks import get, task_entry

    texts = [p["prediction"] for p in ordered]
    return task_entry(get(spec.benchmark), spec.path, samples, texts, item_fingerprints(samples), keep)  # type: ignore[arg-type]


def _with_scores(out: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The result with its summary scores (T, G_v, G_t, G), and each extra metric's."""
    from .metrics import ONE_RULE, metric_view
    from .metrics import scores as summary_scores

    out["scores"] = summary_scores(out)
    if any(t["metric"] not in ONE_RULE for t in out["tasks"].values()):
        for m in extra:
            out[m] = {"scores": summary_scores(metric_view(out, m))}
    return out
