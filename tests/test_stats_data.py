"""Calibration data: both formats, seeded subsets, answer-only labels on real chat templates, bad samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TEXT, build_tiny_llava, tiny_qwen25vl_model
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from forgetless.embedded import export_smollm2
from forgetless.errors import ForgetlessError
from forgetless.stats.data import (
    BadSample,
    Encoder,
    Sample,
    answer_loss,
    collate,
    data_fingerprint,
    iter_batches,
    load_samples,
)

EOT = "<|im_end|>"  # SmolLM2's end of turn

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (  # Qwen2.5-VL's template, without tools and videos
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def smol_tokenizer():
    return AutoTokenizer.from_pretrained(export_smollm2())


@pytest.fixture(scope="module")
def smol_tok():
    return smol_tokenizer()


def tiny_llava_processor() -> LlavaProcessor:
    """A real LLaVA processor for the tiny test models: SmolLM2's tokenizer + <image>, CLIP preprocessing."""
    tok = smol_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # CLIP on 32x32 with patch 8: 16 patches + CLS; "default" drops the CLS -> 16 image tokens
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )


@pytest.fixture(scope="module")
def llava_processor():
    return tiny_llava_processor()


class _Qwen25VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (which needs torchvision, not installed here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )


@pytest.fixture(scope="module")
def qwen_processor():
    tok = smol_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    ip = Qwen2VLImageProcessorPil(
        min_pixels=64, max_pixels=1024, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    return _Qwen25VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_image(path: Path, size=(32, 32), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def labelled_segments(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive labelled positions, as token-id lists."""
    segs, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            segs.append(cur)
            cur = []
    return segs + ([cur] if cur else [])


# ---------------------------------------------------------------------------------------------------------------
# reading


def test_both_formats_parse_to_the_same_samples(tmp_path):
    llava = [
        {
            "id": "s0",
            "image": "imgs/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "s1",
            "conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}],
        },
        {
            "id": 2,
            "image": "imgs/b.png",
            "conversations": [
                {"from": "human", "value": "How many circles?\n<image>"},
                {"from": "gpt", "value": "3"},
            ],
        },
    ]
    plain = [
        {"id": "s0", "image": "imgs/a.png", "question": "What colour is the square?", "answer": "Red."},
        {"id": "s1", "question": "Name a prime.", "answer": "7"},
        {"id": "2", "image": "imgs/b.png", "question": "How many circles?", "answer": "3"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    write_jsonl(tmp_path / "plain.jsonl", plain)
    write_jsonl(tmp_path / "llava.jsonl", llava)
    a = load_samples(tmp_path / "llava.json", shuffle=False)
    b = load_samples(tmp_path / "plain.jsonl", shuffle=False)
    c = load_samples(tmp_path / "llava.jsonl", shuffle=False)
    assert a == b == c
    assert a[0] == Sample(
        "s0", tmp_path / "imgs/a.png", [("user", "What colour is the square?"), ("assistant", "Red.")]
    )
    assert a[1].image is None and a[2].id == "2"
    assert a[2].turns[0] == ("user", "How many circles?")
    # a mixed file, and relative images resolved against image_folder when given
    write_jsonl(tmp_path / "mixed.jsonl", [llava[0], plain[1], llava[2]])
    other = tmp_path / "elsewhere"
    m = load_samples(tmp_path / "mixed.jsonl", shuffle=False, image_folder=other)
    assert [s.id for s in m] == ["s0", "s1", "2"]
    assert m[0].image == other / "imgs/a.png" and m[1].turns == a[1].turns
    # multi-turn conversations keep every turn, in order
    multi = {
        "id": "m",
        "conversations": [
            {"from": "human", "value": "<image>\nQ1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ],
        "image": "x.png",
    }
    (s,) = load_samples(write_jsonl(tmp_path / "multi.jsonl", [multi]))
    assert s.turns == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]


def test_seeded_subset_is_reproducible(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"id": f"q{i}", "question": f"q{i}?", "answer": "a"} for i in range(20)]
    )
    ids = lambda ss: [s.id for s in ss]
    one = ids(load_samples(path, n=8, seed=1))
    assert one == ids(load_samples(path, n=8, seed=1))
    assert one != ids(load_samples(path, n=8, seed=2))
    assert len(set(one)) == 8
    assert ids(load_samples(path, n=3, seed=1)) == one[:3]  # a smaller n is a prefix of a larger one
    assert ids(load_samples(path, n=4, shuffle=False)) == ["q0", "q1", "q2", "q3"]
    assert sorted(ids(load_samples(path, seed=5))) == sorted(f"q{i}" for i in range(20))
    with pytest.raises(ForgetlessError, match=r"25 samples requested but the file has only 20") as ei:
        load_samples(path, n=25)
    assert str(path) in str(ei.value)
    # the fingerprint follows the selection and the file's bytes
    fp = data_fingerprint(path, load_samples(path, n=8, seed=1))
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == data_fingerprint(path, load_samples(path, n=8, seed=1))
    assert fp != data_fingerprint(path, load_samples(path, n=8, seed=2))
    sel = load_samples(path, n=8, seed=1)
    path.write_text(path.read_text() + "\n")
    assert fp != data_fingerprint(path, sel)


def test_malformed_records_name_file_and_place(tmp_path):
    good = {"question": "q", "answer": "a"}
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(ForgetlessError, match="line 3") as ei:
        load_samples(p)
    assert str(p) in str(ei.value)
    q = tmp_path / "bad.json"
    q.write_text(json.dumps([good, {"prompt": "q", "response": "a"}]))
    with pytest.raises(ForgetlessError, match=r"record 1: unknown sample format") as ei:
        load_samples(q)
    assert str(q) in str(ei.value)
    r = write_jsonl(tmp_path / "who.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ForgetlessError, match=r"line 1: conversation turn 0: unknown speaker 'robot'"):
        load_samples(r)


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_text_labels_are_exactly_the_answers_smollm2(smol_tok):
    enc = Encoder(smol_tok)
    answers = ["Four.", "Six, of course."]
    s = Sample(
        "t",
        None,
        [
            ("system", "Be brief."),
            ("user", "What is 2+2?"),
            ("assistant", answers[0]),
            ("user", "And 3+3?"),
            ("assistant", answers[1]),
        ],
    )
    e = enc(s)
    ids, labels = e["input_ids"], e["labels"]
    assert ids.shape == labels.shape == e["attention_mask"].shape and ids.dim() == 1
    segs = labelled_segments(ids, labels)
    assert [smol_tok.decode(g) for g in segs] == [a + EOT for a in answers]
    # independently: the labelled ids are the answer's own tokens followed by the end-of-turn token
    eot = smol_tok.convert_tokens_to_ids(EOT)
    assert segs == [smol_tok(a, add_special_tokens=False)["input_ids"] + [eot] for a in answers]
    # the whole rendering is the template's, and only the answers are labelled
    assert smol_tok.decode(ids) == smol_tok.apply_chat_template(
        [{"role": r, "content": t} for r, t in s.turns], tokenize=False
    )
    assert int((labels != -100).sum()) == sum(len(g) for g in segs)


def test_llava_labels_mask_image_tokens(tmp_path, llava_processor):
    tok = llava_processor.tokenizer
    img = save_image(tmp_path / "a.png", size=(48, 40))
    enc = Encoder(llava_processor)
    e = enc(Sample("v", img, [("user", "What colour is the square?"), ("assistant", "red square")]))
    ids, labels = e["input_ids"], e["labels"]
    image_id = tok.convert_tokens_to_ids("<image>")
    is_image = ids == image_id
    assert int(is_image.sum()) == (32 // 8) ** 2 + 1 - 1 == 16  # the processor's expansion for this config
    assert bool((labels[is_image] == -100).all())
    segs = labelled_segments(ids, labels)
    assert [tok.decode(g) for g in segs] == [" red square" + EOT]
    assert e["pixel_values"].shape == (1, 3, 32, 32)
    # a text-only sample through the same processor has no image tensors
    t = enc(Sample("w", None, [("user", "Say hi."), ("assistant", "hi")]))
    assert "pixel_values" not in t and [
        tok.decode(g) for g in labelled_segments(t["input_ids"], t["labels"])
    ] == [" hi" + EOT]


def test_qwen25vl_labels_and_patches(tmp_path, qwen_processor):
    tok = qwen_processor.tokenizer
    enc = Encoder(qwen_processor)
    a = save_image(tmp_path / "a.png", size=(16, 16))
    b = save_image(tmp_path / "b.png", size=(24, 16))
    ea = enc(Sample("a", a, [("user", "Colour?"), ("assistant", "red")]))
    assert ea["image_grid_thw"].tolist() == [[1, 4, 4]]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((ea["input_ids"] == pad).sum()) == 4 * 4 // 2**2
    assert bool((ea["labels"][ea["input_ids"] == pad] == -100).all())
    assert [tok.decode(g) for g in labelled_segments(ea["input_ids"], ea["labels"])] == ["red" + EOT]
    eb = enc(Sample("b", b, [("user", "Shape?"), ("assistant", "a wide square")]))
    batch = collate([ea, eb], enc.pad_token_id)
    thw = batch["image_grid_thw"]
    assert thw.shape == (2, 3) and batch["pixel_values"].shape[0] == int(thw.prod(-1).sum())
    assert torch.equal(batch["pixel_values"][: ea["pixel_values"].shape[0]], ea["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# the loss these labels define


def tiny_llava_for(processor) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(**{**TEXT, "vocab_size": len(tok), "bos_token_id": None, "eos_token_id": None})
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}


def hand_loss(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for t in range(1, ids.shape[0]):
        if labels[t] != -100:
            total -= torch.log_softmax(logits[t - 1].double(), -1)[ids[t]].item()
            count += 1
    return total / count


def test_answer_cross_entropy_matches_hand_loop(tmp_path, llava_processor):
    model = tiny_llava_for(llava_processor)
    enc = Encoder(llava_processor)
    samples = [
        Sample("img", save_image(tmp_path / "a.png"), [("user", "Colour?"), ("assistant", "red, mostly")]),
        Sample("txt", None, [("user", "Say something long enough."), ("assistant", "ok")]),
    ]
    (batch,) = list(iter_batches(samples, enc, batch_size=2))
    assert batch["sample_index"].tolist() == [0, 1] and batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        per_sample = answer_loss(logits, batch["labels"])
        for i, s in enumerate(samples):
            n = int(batch["attention_mask"][i].sum())
            ref = hand_loss(logits[i, :n], batch["input_ids"][i, :n], batch["labels"][i, :n])
            assert per_sample[i].item() == pytest.approx(ref, rel=1e-5)
            # alone, the sample gives the same loss, and it is the model's own loss with these labels
            single = collate([enc(s)], enc.pad_token_id)
            out = model(**model_inputs(single), labels=single["labels"])
            assert out.loss.item() == pytest.approx(ref, rel=1e-4)


def test_qwen25vl_batch_loss_equals_single_sample_loss(tmp_path, qwen_processor):
    tok = qwen_processor.tokenizer
    model = tiny_qwen25vl_model(0, tok)
    enc = Encoder(qwen_processor)
    samples = [
        Sample("a", save_image(tmp_path / "a.png", (16, 16)), [("user", "Colour?"), ("assistant", "red")]),
        Sample("t", None, [("user", "Count to three, please."), ("assistant", "one two three")]),
        Sample("b", save_image(tmp_path / "b.png", (24, 16)), [("user", "Shape?"), ("assistant", "square")]),
    ]
    (batch,) = list(iter_batches(samples, enc, batch_size=3))
    with torch.no_grad():
        per_sample = answer_loss(model(**model_inputs(batch)).logits, batch["labels"])
        for i, s in enumerate(samples):
            single = collate([enc(s)], enc.pad_token_id)
            logits = model(**model_inputs(single)).logits
            ref = hand_loss(logits[0], single["input_ids"][0], single["labels"][0])
            assert per_sample[i].item() == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# bad samples


def bad_data(tmp_path: Path) -> Path:
    save_image(tmp_path / "ok.png")
    return write_jsonl(
        tmp_path / "cal.jsonl",
        [
            {"id": "good", "image": "ok.png", "question": "Colour?", "answer": "red"},
            {"id": "noimg", "image": "missing.png", "question": "Colour?", "answer": "red"},
            {"id": "empty", "question": "Say nothing.", "answer": "  "},
            {"id": "long", "question": "word " * 200, "answer": "ok"},
            {"id": "good2", "question": "Say hi.", "answer": "hi"},
        ],
    )


def test_bad_samples_error_or_counted_skip(tmp_path, llava_processor):
    path = bad_data(tmp_path)
    samples = load_samples(path, shuffle=False)
    enc = Encoder(llava_processor, max_length=100)
    with pytest.raises(ForgetlessError) as ei:
        list(iter_batches(samples, enc, 2))
    msg = str(ei.value)
    assert (
        str(path) in msg and "'noimg'" in msg and "image not found" in msg and "--on-bad-sample skip" in msg
    )
    with pytest.raises(BadSample, match="empty answer"):
        enc(samples[2])
    with pytest.raises(BadSample, match=r"tokens, longer than the context of 100"):
        enc(samples[3])
    skipped: list = []
    batches = list(iter_batches(samples, enc, 2, on_bad_sample="skip", skipped=skipped))
    assert [r[0] for r in skipped] == ["noimg", "empty", "long"]
    assert (
        "image not found" in skipped[0][1] and "empty answer" in skipped[1][1] and "longer" in skipped[2][1]
    )
    assert [b["sample_index"].tolist() for b in batches] == [[0, 4]]
    # every sample bad: an error even when skipping
    with pytest.raises(ForgetlessError, match="all 3 samples were skipped"):
        list(iter_batches(samples[1:4], enc, 2, on_bad_sample="skip"))


def test_folder_encoder_takes_context_from_config(tmp_path, llava_processor):
    d = build_tiny_llava(tmp_path / "model")
    llava_processor.save_pretrained(d)
    enc = Encoder(d)
    assert isinstance(enc.processor, LlavaProcessor) and enc.max_length == TEXT["max_position_embeddings"]
    samples = load_samples(bad_data(tmp_path), shuffle=False)
    skipped: list = []
    list(iter_batches(samples, enc, 4, on_bad_sample="skip", skipped=skipped))
    assert ("long" in [r[0] for r in skipped]) and "context of 128" in dict(skipped)["long"]
    # a folder with a tokenizer only gets the tokenizer
    smol = Encoder(export_smollm2())
    assert smol.processor is None and smol.max_length == 8192


def test_template_that_rewrites_history_is_refused():
    tok = smol_tokenizer()
    tok.chat_template = (
        "{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(ForgetlessError, match="not prefix-consistent"):
        Encoder(tok)(Sample("x", None, [("user", "q"), ("assistant", "a")]))
