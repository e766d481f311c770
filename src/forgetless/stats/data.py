"""Calibration data: reading samples, encoding them with the model's own processor and chat template, batching.

Two input formats, detected per record, in a ``.json`` list or a ``.jsonl`` file:

- LLaVA conversations: ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``; the
  ``<image>`` placeholder is removed from the text (the image always goes at the start of the first user turn);
- plain question/answer: ``{"id"?, "image"?, "question", "answer", "options"?}``; ``options`` (a list of at least
  two distinct strings, one of them the answer) makes the sample a multiple-choice item (see ``forgetless.eval``).

The loss of a sample is the mean cross-entropy over its *answer* tokens: :class:`Encoder` labels exactly the
tokens of each assistant answer plus the end-of-turn token the chat template puts after it, and masks everything
else (system prompt, user turns, image tokens, template scaffolding) with ``-100``. Answer spans are found by
rendering the conversation up to each assistant turn with and without that turn and tokenizing both, so no
template-specific parsing is needed; a template whose renderings are not prefixes of one another is refused.

An image is refused before it is decoded when it has more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``
(89,478,485 by default: a larger one is most likely a decompression bomb, a small file that expands to gigabytes).

A sample that cannot be used (image missing, unreadable or too large, empty answer, longer than the context) raises
:class:`BadSample`; :func:`iter_batches` turns that into an error naming the file and the sample, or into a counted
skip, as the user chooses. Nothing is ever dropped silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import original
from ..errors import ForgetlessError, loading

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
SKIP_REMEDY = "fix the sample or pass --on-bad-sample skip"
ON_BAD_SAMPLE = ("error", "skip")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# what a model folder's processor or tokenizer is built from: the config (model type, image token, context length),
# the chat template, the tokenizer's and the image processor's files (weights and run records are not)
ENCODING_FILES = (
    "config.json",
    "*.jinja",
    "chat_template*.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges*.txt",
    "*.model",
    "*processor*config*.json",
)
# files whose presence marks a folder as having a multimodal processor (not just a tokenizer)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "image_processor_config.json")


@dataclass
class Sample:
    """One calibration conversation. ``turns`` are ``(role, text)`` with role ``user``/``assistant``/``system``.

    The image, if any, belongs at the start of the first user turn. ``source`` (the data file) and ``index`` (the
    record's position in it) are for messages only and do not take part in equality. ``options``, for a
    multiple-choice question/answer record, are the candidate answers (stripped; the answer is one of them).
    """

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    source: Path | None = field(default=None, compare=False, repr=False)
    index: int | None = field(default=None, compare=False, repr=False)
    options: tuple[str, ...] | None = None


def encoding_fingerprint(model_dir: Path, *settings: Any) -> str | None:
    """A digest of what an Encoder of `model_dir` is built from (its :data:`ENCODING_FILES`, names and bytes) and
    of its `settings`: two folders with the same fingerprint encode every sample alike (a fine-tune or a merge of
    one base, which copy its tokenizer and processor files); None where one of them cannot be read."""
    h = hashlib.sha256(repr(settings).encode())
    names = sorted({p.name for pattern in ENCODING_FILES for p in model_dir.glob(pattern) if p.is_file()})
    for name in names:
        try:
            data = (model_dir / name).read_bytes()
        except OSError:  # a file the encoder may not need: no fingerprint, nothing remembered
            return None
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


class BadSample(ForgetlessError):
    """A sample that cannot be used as it is; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs; ``where`` is ``line N`` (JSONL) or ``record N`` (JSON list), for messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ForgetlessError(
            "calibration data file not found", file=path, remedy="check the path of the data file"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ForgetlessError(
            f"cannot read the calibration data ({e})", file=path, remedy="pass a UTF-8 .json or .jsonl file"
        ) from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ForgetlessError(
                f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                file=path,
                remedy="fix the file (a JSON list of samples, or one JSON object per line)",
            ) from None
        except RecursionError:  # caught rather than pre-scanned: data files run to gigabytes
            raise ForgetlessError(
                "JSON nested too deep to read",
                file=path,
                remedy="fix the file (a JSON list of samples, or one JSON object per line)",
            ) from None
        return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as e:
            what = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deep"
            raise ForgetlessError(
                f"line {lineno}: invalid JSON ({what})",
                file=path,
                remedy="fix the line (JSON Lines: one JSON object per line)",
            ) from None
    return out


def _clean(text: str) -> tuple[str, bool]:
    """Text without the LLaVA image placeholder, stripped; and whether the placeholder was there."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip(), IMAGE_PLACEHOLDER in text


def _parse(record: Any, where: str, index: int, path: Path, image_folder: Path) -> Sample:
    def bad(problem: str) -> ForgetlessError:
        return ForgetlessError(
            f"{where}: {problem}",
            file=path,
            remedy="each sample is a LLaVA conversation {id, image?, conversations: "
            "[{from: human|gpt, value}]} or {image?, question, answer}",
        )

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, found {type(record).__name__}")
    placeholder = False
    options = None
    if "conversations" in record:
        if record.get("options") is not None:
            raise bad("'options' (multiple choice) is supported with question/answer records only")
        conv = record["conversations"]
        if not isinstance(conv, list) or not conv:
            raise bad("'conversations' must be a non-empty list")
        turns = []
        for j, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise bad(f"conversation turn {j} is not an object")
            role = msg.get("from", msg.get("role"))
            value = msg.get("value", msg.get("content"))
            if role not in ROLES:
                raise bad(f"conversation turn {j}: unknown speaker {role!r} (expected 'human' or 'gpt')")
            if not isinstance(value, str):
                raise bad(f"conversation turn {j}: 'value' must be a string")
            text, had = _clean(value)
            placeholder |= had
            turns.append((ROLES[role], text))
    elif "question" in record and "answer" in record:
        q, a = record["question"], record["answer"]
        if not isinstance(q, str) or not isinstance(a, str):
            raise bad("'question' and 'answer' must be strings")
        q, placeholder = _clean(q)
        turns = [("user", q), ("assistant", a.strip())]
        if record.get("options") is not None:
            opts = record["options"]
            if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
                raise bad("'options' must be a list of strings")
            options = tuple(o.strip() for o in opts)
            if len(options) < 2 or len(set(options)) != len(options) or not all(options):
                raise bad(f"'options' must hold at least two distinct non-empty strings, got {opts!r}")
            if a.strip() not in options:
                raise bad(f"the answer {a.strip()!r} is not one of the options {list(options)!r}")
    else:
        raise bad(
            f"unknown sample format (keys: {sorted(record)}); expected 'conversations', "
            "or 'question' and 'answer'"
        )
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise bad(f"{len(image)} images in one sample; one image per sample is supported")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise bad("'image' must be a path (string)")
    if image is None and placeholder:
        raise bad(f"the text has an {IMAGE_PLACEHOLDER} placeholder but the sample names no image")
    if "id" in record and not isinstance(record["id"], (str, int)):
        raise bad("'id' must be a string or an integer")
    sid = str(record.get("id", index))
    img = None
    if image:
        img = Path(image).expanduser()
        if not img.is_absolute():
            img = image_folder / img
    return Sample(id=sid, image=img, turns=turns, source=path, index=index, options=options)


def load_samples(
    path: str | os.PathLike,
    *,
    image_folder: str | os.PathLike | None = None,
    n: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> list[Sample]:
    """Samples of a ``.json`` list or ``.jsonl`` file, either format per record.

    Relative image paths are resolved against ``image_folder`` (default: the data file's folder). With ``n``,
    a seeded permutation of all samples is drawn (``shuffle=False``: file order) and its first ``n`` are kept, so a
    smaller ``n`` with the same seed gives a prefix of a larger one. Image files are not opened here: a missing
    one is reported when the sample is encoded (see :func:`iter_batches`).
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    samples = [_parse(r, where, i, path, folder) for i, (where, r) in enumerate(_read_records(path))]
    if not samples:
        raise ForgetlessError("no samples in the calibration data", file=path, remedy="pass a non-empty file")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ForgetlessError(
            f"the sample count must be a positive integer, got {n!r}",
            file=path,
            remedy="pass --samples N with N ≥ 1",
        )
    if n is not None and n > len(samples):
        raise ForgetlessError(
            f"{n} samples requested but the file has only {len(samples)}",
            file=path,
            remedy=f"ask for at most {len(samples)} samples or add data",
        )
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [samples[i] for i in order[: n if n is not None else len(order)]]


def data_fingerprint(path: str | os.PathLike, samples: Iterable[Sample]) -> str:
    """16 hex digits of the sha256 of the data file's bytes and the selected sample ids, in order."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0ids\0")
    for s in samples:
        h.update(s.id.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# encoding


def _max_positions(model_dir: Path) -> int | None:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for c in (cfg.get("text_config") or {}, cfg):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Any]:
    """The image opened lazily (its header read, its pixels not yet decoded), after checking that it exists and
    that its pixel count is within Pillow's ``MAX_IMAGE_PIXELS``; :class:`BadSample` otherwise."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadSample(f"image not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with (
            warnings.catch_warnings()
        ):  # Pillow warns from the limit up and refuses from twice it: one rule here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise BadSample(
            f"image {path} has more pixels than twice the limit of {limit:,} (Pillow's "
            "MAX_IMAGE_PIXELS): refused as a possible decompression bomb"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise BadSample(f"cannot read image {path}: {e}") from None
    with im:
        w, h = im.size
        if limit is not None and w * h > limit:
            raise BadSample(
                f"image {path} has {w}×{h} = {w * h:,} pixels, more than the limit of {limit:,} "
                "(Pillow's MAX_IMAGE_PIXELS): refused as a possible decompression bomb"
            )
        yield im


def check_image(path: str | os.PathLike) -> None:
    """Raise :class:`BadSample` for an image that is missing, unreadable or over the pixel limit; decode nothing."""
    with open_image(path):
        pass


def with_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None, source: Path | None) -> Any:
    """A copy of ``processor`` whose dynamic-resolution image processor keeps each image within
    [``min_pixels``, ``max_pixels``] pixels (None: the processor's own bound); the given processor is not changed."""
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None)
    if images is None or not hasattr(images, "merge_size") or getattr(size, "longest_edge", None) is None:
        raise ForgetlessError(
            "--min-pixels / --max-pixels bound a dynamic-resolution image processor (Qwen2-VL, "
            "Qwen2.5-VL); this model's has none",
            file=source,
            remedy="drop --min-pixels / --max-pixels",
        )
    low = size.shortest_edge if min_pixels is None else min_pixels
    high = size.longest_edge if max_pixels is None else max_pixels
    if not 0 < low <= high:
        raise ForgetlessError(
            f"the pixel bounds [{low}, {high}] are empty",
            file=source,
            remedy="give 0 < --min-pixels ≤ --max-pixels",
        )
    processor = copy.deepcopy(processor)
    processor.image_processor.size = {"shortest_edge": low, "longest_edge": high}
    return processor


class Encoder:
    """Turns a :class:`Sample` into the model's inputs and answer-only labels, for one sample at a time.

    ``model_dir_or_processor``: a model folder (its processor is loaded when it has one — LLaVA, Qwen2.5-VL —
    else its tokenizer), or an already built processor or tokenizer. ``max_length`` defaults to the model
    config's ``max_position_embeddings`` (a folder) or the tokenizer's ``model_max_length`` when it is finite.
    ``min_pixels`` / ``max_pixels``: the bounds a dynamic-resolution image processor (Qwen2-VL, Qwen2.5-VL)
    resizes each image into — the image's tokens, and so the memory, grow with its pixels.
    """

    def __init__(
        self,
        model_dir_or_processor: Any,
        *,
        max_length: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        obj = model_dir_or_processor
        self.source = None
        # equal for Encoders that encode every sample alike; None: unknown
        self.fingerprint: str | None = None
        if isinstance(obj, (str, os.PathLike)):
            d = Path(obj)
            self.source = d
            if not d.is_dir():
                raise ForgetlessError(
                    "model folder not found", file=d, remedy="pass a Hugging Face model folder"
                )
            if max_length is None:
                max_length = _max_positions(d)
            obj = self._load(d)
            if not original.is_original(d):  # whose image processor may come from a CLIP folder elsewhere
                self.fingerprint = encoding_fingerprint(d, max_length, min_pixels, max_pixels)
        if min_pixels is not None or max_pixels is not None:
            obj = with_pixels(obj, min_pixels, max_pixels, self.source)
        if hasattr(obj, "tokenizer") and hasattr(obj, "image_processor"):
            self.processor, self.tokenizer = obj, obj.tokenizer
            self.image_token = getattr(obj, "image_token", IMAGE_PLACEHOLDER)
        else:
            self.processor, self.tokenizer = None, obj
            self.image_token = None
        if max_length is None:
            mml = getattr(self.tokenizer, "model_max_length", None)
            max_length = mml if isinstance(mml, int) and mml < 10**8 else None
        self.max_length = max_length
        if not getattr(obj, "chat_template", None) and not getattr(self.tokenizer, "chat_template", None):
            raise ForgetlessError(
                "the tokenizer/processor has no chat template",
                file=self.source,
                remedy="use the instruction-tuned model's folder (with chat_template.jinja)",
            )

    @staticmethod
    def _load(d: Path):
        from transformers import AutoProcessor, AutoTokenizer

        if original.is_original(d):
            return original.processor(d)
        with loading(
            "the processor/tokenizer", d, "the folder needs the tokenizer (and processor) files of the model"
        ):
            if any((d / f).is_file() for f in PROCESSOR_FILES):
                return AutoProcessor.from_pretrained(d)
            return AutoTokenizer.from_pretrained(d)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for t in (tok.pad_token_id, tok.eos_token_id):
            if t is not None:
                return int(t)
        return 0

    # -- rendering and tokenizing --

    def _messages(self, sample: Sample) -> list[dict]:
        msgs, image_pending = [], sample.image is not None
        for role, text in sample.turns:
            if self.processor is None:
                msgs.append({"role": role, "content": text})
                continue
            content: list[dict] = []
            if image_pending and role == "user":
                content.append({"type": "image"})
                image_pending = False
            content.append({"type": "text", "text": text})
            msgs.append({"role": role, "content": content})
        if image_pending and self.processor is not None:
            raise BadSample("the sample has an image but no user turn to put it in")
        return msgs

    def _render(self, msgs: list[dict], generation_prompt: bool) -> str:
        t = self.processor if self.processor is not None else self.tokenizer
        return t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str, image) -> dict[str, torch.Tensor]:
        if self.processor is None:
            return dict(self.tokenizer(text, add_special_tokens=False, return_tensors="pt"))
        kw: dict[str, Any] = {}
        bos = self.tokenizer.bos_token
        if bos is not None and text.startswith(bos):  # the template wrote BOS itself (as transformers does)
            kw["add_special_tokens"] = False
        images = [image] if image is not None and self.image_token in text else None
        return dict(self.processor(text=[text], images=images, return_tensors="pt", **kw))

    def _open_image(self, path: Path):
        with open_image(path) as im:
            try:
                return im.convert("RGB")
            except (OSError, ValueError) as e:
                raise BadSample(f"cannot read image {path}: {e}") from None

    def _is_blank(self, token_id: int) -> bool:
        return not self.tokenizer.decode([token_id]).strip()

    def __call__(
        self, sample: Sample, known: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The sample's inputs and labels. `known`: token ids of texts already tokenized with this sample's image,
        filled here (the options of one multiple-choice item share it, so their prompt is tokenized once)."""
        answers = [k for k, (role, _) in enumerate(sample.turns) if role == "assistant"]
        if not answers:
            raise BadSample("no answer (the conversation has no assistant turn)")
        for k in answers:
            if not sample.turns[k][1].strip():
                raise BadSample(f"empty answer (turn {k})")
        if sample.image is not None and self.processor is None:
            raise BadSample("the sample has an image but the model has no image processor")
        image = self._open_image(Path(sample.image)) if sample.image is not None else None
        msgs = self._messages(sample)

        full_text = self._render(msgs, False)
        enc = self._tokenize(full_text, image)
        cache = known if known is not None else {}
        cache[full_text] = enc["input_ids"][0]

        def token_ids(text: str) -> torch.Tensor:
            if text not in cache:
                cache[text] = self._tokenize(text, image)["input_ids"][0]
            return cache[text]

        ids = enc["input_ids"][0]
        if self.max_length is not None and ids.numel() > self.max_length:
            raise BadSample(f"{ids.numel()} tokens, longer than the context of {self.max_length}")
        labels = torch.full_like(ids, IGNORE_INDEX)
        for k in answers:
            prompt_text, turn_text = self._render(msgs[:k], True), self._render(msgs[: k + 1], False)
            if not (full_text.startswith(turn_text) and turn_text.startswith(prompt_text)):
                raise ForgetlessError(
                    "the chat template is not prefix-consistent: the conversation rendered up to an answer is "
                    "not a prefix of the conversation rendered with it, so answer tokens cannot be located",
                    file=self.source,
                    remedy="use a chat template that renders earlier turns unchanged",
                )
            start, stop = token_ids(prompt_text), token_ids(turn_text)
            if not (torch.equal(ids[: len(start)], start) and torch.equal(ids[: len(stop)], stop)):
                raise BadSample(
                    f"answer {k} does not tokenize apart from its prompt (tokens merge across the boundary)"
                )
            a, b = len(start), len(stop)
            # the template's own whitespace (e.g. the newline after <|im_end|>) is scaffolding, not answer
            while a < b and self._is_blank(int(ids[a])):
                a += 1
            while b > a and self._is_blank(int(ids[b - 1])):
                b -= 1
            if a == b:
                raise BadSample(f"empty answer (turn {k} has no tokens)")
            labels[a:b] = ids[a:b]

        out: dict[str, torch.Tensor] = {}
        for key, v in enc.items():
            if not isinstance(v, torch.Tensor):
                continue
            # per-token tensors lose the batch dimension; image tensors keep the processor's layout
            out[key] = v[0] if v.dim() == 2 and v.shape == enc["input_ids"].shape else v
        out["labels"] = labels
        return out


# ----------------------------------------------------------------------------------------------------------------
# batching


def collate(encoded: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch. Per-token tensors are padded (``input_ids`` with ``pad_token_id``, ``labels`` with
    -100, the rest with 0); image tensors are concatenated along their first dimension in sample order, as the
    processors lay them out for a batch (LLaVA ``[n_images, 3, H, W]``; Qwen2.5-VL patches with one
    ``image_grid_thw`` row per image). ``sample_index`` holds each row's index in the sample list."""
    if not encoded:
        raise ValueError("collate needs at least one encoded sample")
    lengths = [e["input_ids"].shape[0] for e in encoded]
    width = max(lengths)
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    keys = list(dict.fromkeys(k for e in encoded for k in e if k != "sample_index"))
    for key in keys:
        per_token = all(
            key in e and e[key].dim() == 1 and e[key].shape[0] == n for e, n in zip(encoded, lengths)
        )
        if per_token:
            rows = torch.full((len(encoded), width), pads.get(key, 0), dtype=encoded[0][key].dtype)
            for i, e in enumerate(encoded):
                rows[i, : lengths[i]] = e[key]
            batch[key] = rows
        else:
            batch[key] = torch.cat([e[key] for e in encoded if key in e], dim=0)
    batch["sample_index"] = torch.tensor(
        [int(e.get("sample_index", i)) for i, e in enumerate(encoded)], dtype=torch.long
    )
    return batch


def encode_or_skip(
    encoder: Encoder, sample: Sample, on_bad_sample: str, skipped: list
) -> dict[str, torch.Tensor] | None:
    """The sample's encoding; a :class:`BadSample` becomes an error naming the file and sample
    (``on_bad_sample="error"``) or a ``(id, reason)`` appended to ``skipped`` and ``None`` (``"skip"``)."""
    try:
        return encoder(sample)
    except BadSample as e:
        if on_bad_sample == "error":
            raise _bad(sample, e) from None
        skipped.append((sample.id, e.reason))
        return None


def _bad(sample: Sample, e: BadSample) -> ForgetlessError:
    return ForgetlessError(f"sample {sample.id!r}: {e.reason}", file=sample.source, remedy=SKIP_REMEDY)


def check_images(samples: Iterable[Sample], on_bad_sample: str) -> None:
    """With ``on_bad_sample="error"``, the first missing, unreadable or oversized image is named before the model
    is loaded (only headers are read); with ``"skip"`` its sample is skipped when it is encoded."""
    if on_bad_sample != "error":
        return
    for s in samples:
        if s.image is not None:
            try:
                check_image(s.image)
            except BadSample as e:
                raise _bad(s, e) from None


def iter_batches(
    samples: list[Sample],
    encoder: Encoder,
    batch_size: int,
    *,
    on_bad_sample: str = "error",
    skipped: list | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of encoded samples, in order. A :class:`BadSample` stops with an error naming the data file, the
    sample and the reason (``on_bad_sample="error"``), or is recorded as ``(id, reason)`` in ``skipped`` and left
    out (``"skip"``). If every sample is bad, that is an error in either mode."""
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ForgetlessError(
            f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}",
            remedy="pass --on-bad-sample error or --on-bad-sample skip",
        )
    if batch_size < 1:
        raise ForgetlessError(
            f"batch size must be ≥ 1, got {batch_size}", remedy="pass a positive batch size"
        )
    pending: list[dict[str, torch.Tensor]] = []
    n_ok, reasons = 0, []
    for i, s in enumerate(samples):
        enc = encode_or_skip(encoder, s, on_bad_sample, reasons)
        if enc is None:
            if skipped is not None:
                skipped.append(reasons[-1])
            continue
        enc["sample_index"] = torch.tensor(i)
        pending.append(enc)
        n_ok += 1
        if len(pending) == batch_size:
            yield collate(pending, encoder.pad_token_id)
            pending = []
    if pending:
        yield collate(pending, encoder.pad_token_id)
    if samples and n_ok == 0:
        first = samples[0].source
        sid, why = reasons[0]
        raise ForgetlessError(
            f"all {len(samples)} samples were skipped as bad (first: {sid!r}: {why})",
            file=first,
            remedy="fix the calibration data",
        )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``[B]``: the mean cross-entropy over each row's answer tokens (labels shifted by one, as
    causal LMs predict the next token). Computed in fp32."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    mask = (target != IGNORE_INDEX).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)
