"""Evaluation harness: option scores against a naive full-sequence computation, greedy generation against a
hand-written loop, the T/G/E/F metrics on hand-made results, the table/JSON/plot, the CLI, bad option records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_llama_with_tokenizer, tiny_qwen25vl_model
from PIL import Image
from test_stats_data import (
    QWEN_TEMPLATE,
    QWEN_TOKENS,
    _Qwen25VLImageOnlyProcessor,
    save_image,
    smol_tokenizer,
    tiny_llava_for,
    tiny_llava_processor,
    write_jsonl,
)
from transformers import (
    AutoModelForCausalLM,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from forgetless.errors import ForgetlessError
from forgetless.eval import (
    TradeoffPoint,
    compare,
    evaluate,
    format_table,
    generate_answers,
    read_json,
    resolve_task,
    score_options,
    scores,
    table_row,
    tradeoff_plot,
    write_json,
)
from forgetless.stats.data import Encoder, Sample, collate, load_samples

torch.set_num_threads(1)

QUESTIONS = [  # options of different token lengths, prompts of different lengths
    ("What colour is the sky on a clear day?", ("blue", "a pale shade of green", "red")),
    ("Two plus two?", ("four", "five or maybe six")),
    ("Name the animal that barks loudly at night in the yard.", ("dog", "cat", "a very large horse", "owl")),
]


# ---------------------------------------------------------------------------------------------------------------
# fixtures and independent references


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_llama_with_tokenizer(
        tmp_path_factory.mktemp("eval_llama"), tie=False
    )  # tied, it echoes "\n"


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), Encoder(llama_dir)


@pytest.fixture(scope="module")
def llava_processor():
    return tiny_llava_processor()


def mc_samples(images: list[Path | None]) -> list[Sample]:
    return [
        Sample(f"s{i}", img, [("user", q), ("assistant", opts[0])], options=opts)
        for i, (img, (q, opts)) in enumerate(zip(images, QUESTIONS))
    ]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "sample_index")}


def naive_scores(model, enc: Encoder, sample: Sample, option: str) -> tuple[float, int, float, int]:
    """Run the whole (question, option) sequence alone: the summed log-softmax at the labelled tokens and their
    count, then the same over the tokens after the last labelled one (the template's tail)."""
    e = enc(Sample(sample.id, sample.image, [sample.turns[0], ("assistant", option)]))
    logits = model(**model_inputs(collate([e], enc.pad_token_id))).logits[0].double()
    ids, labels = e["input_ids"], e["labels"]
    last = max(t for t in range(ids.shape[0]) if labels[t] != -100)
    total, count, tail, k = 0.0, 0, 0.0, 0
    for t in range(1, ids.shape[0]):
        lp = torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
        if labels[t] != -100:
            total, count = total + lp, count + 1
        elif t > last:
            tail, k = tail + lp, k + 1
    return total, count, tail, k


def naive_option_logprob(model, enc: Encoder, sample: Sample, option: str) -> tuple[float, int]:
    """Run the whole (question, option) sequence alone; sum log-softmax at the labelled tokens."""
    return naive_scores(model, enc, sample, option)[:2]


def check_against_naive(model, enc: Encoder, samples: list[Sample], batch_size: int) -> None:
    """The harness's scores (prompt once, its KV cache reused for every option) equal each (question, option)
    sequence run alone, answer and tail tokens."""
    with torch.no_grad():
        got = score_options(model, enc, samples, batch_size=batch_size)
        assert len(got) == len(samples)
        for s, sc in zip(samples, got):
            ref = [naive_scores(model, enc, s, o) for o in s.options]
            assert sc.num_tokens == [r[1] for r in ref] and sc.tail_tokens == [r[3] for r in ref]
            assert sc.logprobs == pytest.approx([r[0] for r in ref], abs=1e-4)
            assert sc.tail_logprobs == pytest.approx([r[2] for r in ref], abs=1e-4)
            best = max(range(len(ref)), key=lambda j: (ref[j][0], -j))
            assert sc.predicted == best
    assert all(k > 0 for sc in got for k in sc.tail_tokens)  # every template here renders a tail
    # the options of a sample really have different lengths (so the padded option pass is exercised)
    assert any(len(set(sc.num_tokens)) > 1 for sc in got)


# ---------------------------------------------------------------------------------------------------------------
# multiple choice


def test_option_scores_equal_naive_on_llama(llama):
    model, enc = llama
    samples = mc_samples([None, None, None])
    check_against_naive(model, enc, samples, batch_size=2)  # a batch of two prompts, then one
    # and the naive path of the harness gives the same numbers
    with torch.no_grad():
        fast = score_options(model, enc, samples, batch_size=3)
        slow = score_options(model, enc, samples, batch_size=3, naive=True)
    for a, b in zip(fast, slow):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.tail_logprobs == pytest.approx(b.tail_logprobs, abs=1e-4) and a.tail_tokens == b.tail_tokens


def test_option_scores_equal_naive_on_llava_with_images(tmp_path, llava_processor):
    model = tiny_llava_for(llava_processor)
    enc = Encoder(llava_processor)
    imgs = [
        save_image(tmp_path / "a.png", color=(200, 30, 30)),
        None,
        save_image(tmp_path / "b.png", (40, 32), color=(10, 120, 240)),
    ]
    check_against_naive(model, enc, mc_samples(imgs), batch_size=3)


def test_option_scores_equal_naive_on_qwen25vl(tmp_path):
    tok = smol_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    ip = Qwen2VLImageProcessorPil(
        min_pixels=64, max_pixels=1024, patch_size=4, merge_size=2, temporal_patch_size=2
    )
    proc = _Qwen25VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    model = tiny_qwen25vl_model(0, tok)
    imgs = [save_image(tmp_path / "a.png", (16, 16)), None, save_image(tmp_path / "b.png", (24, 16))]
    check_against_naive(model, Encoder(proc), mc_samples(imgs), batch_size=3)


def test_ties_go_to_the_lowest_index():
    from forgetless.eval import OptionScores

    assert OptionScores([-2.0, -1.0, -1.0], [1, 1, 1]).predicted == 1
    assert OptionScores([-0.5, -3.0], [2, 1]).predicted == 0
    sc = OptionScores([-4.0, -2.0, -6.0], [2, 1, 3], [4, 2, 6], [-2.0, -2.0, -2.0], [1, 1, 1])
    assert [sc.predicted_by(m) for m in ("acc", "acc_norm", "lmms_eval_acc")] == [
        1,
        0,
        0,
    ]  # -1 a char, -2 a token
    with pytest.raises(ForgetlessError, match="needs scores"):
        OptionScores([-1.0], [1]).predicted_by("acc_norm")


def lm_eval_prediction(logprobs: list[float], options: tuple[str, ...], metric: str) -> int:
    """lm-evaluation-harness's choice (lm_eval/api/task.py, multiple_choice): argmax of the log-likelihoods
    (acc), or of them divided by each choice string's length (acc_norm)."""
    lls = np.array(logprobs)
    return int(np.argmax(lls if metric == "acc" else lls / np.array([float(len(o)) for o in options])))


def lmms_eval_loss(model, tok, question: str, option: str) -> float:
    """lmms-eval's log-likelihood request as its LLaVA models compute it: the conversation rendered by the chat
    template without and with the answer, every token after the prompt labelled, the model's own mean loss."""
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": option}]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, : tok(prompt, return_tensors="pt")["input_ids"].shape[1]] = -100
    return float(model(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("naive", [False, True])
def test_acc_norm_and_lmms_eval_acc_equal_the_harnesses_rules(llama, naive):
    model, enc = llama
    samples = mc_samples([None, None, None])
    differ = set()
    with torch.no_grad():
        got = score_options(model, enc, samples, batch_size=3, naive=naive)
        for s, sc in zip(samples, got):
            lls = [naive_option_logprob(model, enc, s, o)[0] for o in s.options]
            losses = [lmms_eval_loss(model, enc.tokenizer, s.turns[0][1], o) for o in s.options]
            assert sc.num_chars == [len(o) for o in s.options]
            assert sc.values("acc_norm") == pytest.approx(
                [lp / len(o) for lp, o in zip(lls, s.options)], abs=1e-5
            )
            assert [-v for v in sc.values("lmms_eval_acc")] == pytest.approx(losses, abs=1e-5)
            picks = {
                "acc": sc.predicted,
                "acc_norm": sc.predicted_by("acc_norm"),
                "lmms_eval_acc": sc.predicted_by("lmms_eval_acc"),
            }
            assert picks["acc"] == lm_eval_prediction(lls, s.options, "acc")
            assert picks["acc_norm"] == lm_eval_prediction(lls, s.options, "acc_norm")
            assert picks["lmms_eval_acc"] == int(
                np.argmin(losses)
            )  # lmms-eval: argmin of the returned losses
            differ |= {m for m in ("acc_norm", "lmms_eval_acc") if picks[m] != picks["acc"]}
            if picks["acc_norm"] != picks["acc"]:  # between options of different lengths
                assert sc.num_tokens[picks["acc_norm"]] != sc.num_tokens[picks["acc"]]
    assert differ == {"acc_norm", "lmms_eval_acc"}  # each ranks some sample otherwise than acc


# ---------------------------------------------------------------------------------------------------------------
# generation


def greedy_loop(model, ids: torch.Tensor, stops: set[int], n: int, **image) -> list[int]:
    """Argmax token by token, the whole sequence each step, no cache, no padding."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(
            model(input_ids=torch.cat([ids, torch.tensor(out, dtype=ids.dtype)])[None], **image)
            .logits[0, -1]
            .argmax()
        )
        if nxt in stops:
            break
        out.append(nxt)
    return out


def test_generation_equals_greedy_loop_on_llama(llama):
    model, enc = llama
    tok = enc.tokenizer
    samples = mc_samples([None, None, None])
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    with torch.no_grad():
        got = generate_answers(model, enc, samples, max_new_tokens=5, batch_size=3)
        for s, text in zip(samples, got):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": s.turns[0][1]}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            ref = greedy_loop(model, ids, stops, 5)
            assert text == tok.decode(ref, skip_special_tokens=True).strip()
    assert all(got) and len(set(got)) > 1  # prompts of different lengths in one left-padded batch


def test_generation_equals_greedy_loop_on_llava(tmp_path, llava_processor):
    model = tiny_llava_for(llava_processor)
    enc = Encoder(llava_processor)
    samples = mc_samples([save_image(tmp_path / "a.png"), None, None])[:2]
    eos = llava_processor.tokenizer.eos_token_id
    with torch.no_grad():
        got = generate_answers(model, enc, samples, max_new_tokens=4, batch_size=2)
        for s, text in zip(samples, got):
            content = ([{"type": "image"}] if s.image else []) + [{"type": "text", "text": s.turns[0][1]}]
            prompt = llava_processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            image = [Image.open(s.image).convert("RGB")] if s.image else None
            inputs = llava_processor(text=[prompt], images=image, return_tensors="pt")
            extra = {"pixel_values": inputs["pixel_values"]} if s.image else {}
            ref = greedy_loop(model, inputs["input_ids"][0], {eos}, 4, **extra)
            assert text == llava_processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert all(got) and got[0] != got[1]


# ---------------------------------------------------------------------------------------------------------------
# metrics, table, files, plot


def result(accs: dict[str, tuple[str, float]], split: str = "test") -> dict:
    return {
        "split": split,
        "tasks": {k: {"kind": kind, "accuracy": a, "n": 10} for k, (kind, a) in accs.items()},
    }


BASE = result(
    {
        "shapes": ("downstream", 0.2),
        "digits": ("downstream", 0.4),
        "scene": ("general_visual", 0.8),
        "facts": ("general_text", 0.6),
        "trivia": ("general_text", 0.7),
    }
)
FT = result(
    {
        "shapes": ("downstream", 0.9),
        "digits": ("downstream", 0.7),
        "scene": ("general_visual", 0.5),
        "facts": ("general_text", 0.3),
        "trivia": ("general_text", 0.5),
    }
)
MERGED = result(
    {
        "shapes": ("downstream", 0.7),
        "digits": ("downstream", 0.6),
        "scene": ("general_visual", 0.7),
        "facts": ("general_text", 0.6),
        "trivia": ("general_text", 0.6),
    }
)


def test_metrics_on_hand_made_results():
    s = scores(BASE)
    assert (
        s["T"] == pytest.approx(30.0) and s["G_v"] == pytest.approx(80.0) and s["G_t"] == pytest.approx(65.0)
    )
    assert s["G"] == pytest.approx(72.5)  # mean of G_v and G_t, not of the three general tasks
    c = compare(MERGED, BASE, FT)
    # T(m) = 65, G(m) = (70 + 60) / 2 = 65; T(ft) = 80
    assert c["E"] == pytest.approx(35.0) and c["F"] == pytest.approx(-7.5) and c["E+F"] == pytest.approx(27.5)
    assert c["gain_kept"] == pytest.approx(35.0 / 50.0)
    ft = compare(FT, BASE)
    assert ft["E"] == pytest.approx(50.0) and ft["F"] == pytest.approx((50 + 40) / 2 - 72.5)
    assert ft["gain_kept"] is None
    only_text = result({"t": ("downstream", 0.5), "g": ("general_text", 0.25)})
    assert scores(only_text) == {"T": 50.0, "G_v": None, "G_t": 25.0, "G": 25.0}
    with pytest.raises(ForgetlessError, match="not in the base"):
        compare(MERGED, result({"shapes": ("downstream", 0.1)}))
    with pytest.raises(ForgetlessError, match="split"):
        compare(MERGED, {**BASE, "split": "val"})


def test_table_json_and_plot(tmp_path):
    rows = [table_row("base", BASE, BASE), table_row("merged", MERGED, BASE, FT)]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == [
        "model",
        "shapes",
        "digits",
        "scene",
        "facts",
        "trivia",
        "T",
        "G_v",
        "G_t",
        "G",
        "E",
        "F",
        "E+F",
    ]
    assert lines[3].split() == [
        "merged",
        "70.0",
        "60.0",
        "70.0",
        "60.0",
        "60.0",
        "65.0",
        "70.0",
        "60.0",
        "65.0",
        "+35.0",
        "-7.5",
        "+27.5",
    ]
    assert len({len(line) for line in lines[:2]}) == 1  # fixed width
    p = write_json(tmp_path / "out" / "r.json", {**MERGED, "x": [1, 2]})
    assert json.loads(p.read_text())["x"] == [1, 2] and [f.name for f in p.parent.iterdir()] == ["r.json"]
    assert read_json(p)["tasks"]["shapes"]["accuracy"] == 0.7
    pts = [
        TradeoffPoint("base", 30, 72.5, role="base"),
        TradeoffPoint("finetuned", 80, 45, role="finetuned"),
        *[TradeoffPoint("wise", 30 + 50 * a, 72.5 - 27.5 * a * a, knob=a) for a in (0.75, 0.25, 0.5)],
        {"method": "cgm", "task": 65, "general": 65, "knob": 0.2, "chosen": True},
    ]
    png = tradeoff_plot(pts, tmp_path / "plot.png", title="trade-off")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (768, 576)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out", "plot.png"]


# ---------------------------------------------------------------------------------------------------------------
# data: options records


def test_options_records_parse_and_bad_ones_name_the_file(tmp_path):
    good = write_jsonl(
        tmp_path / "good.jsonl",
        [
            {"id": "a", "question": "Q?", "answer": " yes ", "options": ["yes", "no"]},
            {"id": "b", "question": "Q?", "answer": "x"},
        ],
    )
    a, b = load_samples(good, shuffle=False)
    assert a.options == ("yes", "no") and b.options is None
    bad = [
        {"question": "Q?", "answer": "maybe", "options": ["yes", "no"]},
        {"question": "Q?", "answer": "yes", "options": ["yes"]},
        {"question": "Q?", "answer": "yes", "options": ["yes", "yes "]},
        {"question": "Q?", "answer": "yes", "options": "yes,no"},
        {"question": "Q?", "answer": "yes", "options": ["yes", 3]},
    ]
    for i, rec in enumerate(bad):
        f = write_jsonl(tmp_path / f"bad{i}.jsonl", [{"id": "ok", "question": "Q", "answer": "A"}, rec])
        with pytest.raises(ForgetlessError, match="options") as e:
            load_samples(f)
        assert str(f) in str(e.value) and "line 2" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# tasks, evaluate and the CLI


def test_resolve_task_by_file_folder_and_name(tmp_path, monkeypatch):
    folder = tmp_path / "root" / "shapes"
    folder.mkdir(parents=True)
    write_jsonl(folder / "test.jsonl", [{"question": "Q", "answer": "A"}])
    (folder / "task.json").write_text(
        json.dumps({"name": "shapes", "kind": "general_visual", "metric": "exact"})
    )
    loose = write_jsonl(tmp_path / "loose.jsonl", [{"question": "Q", "answer": "A"}])
    assert resolve_task(folder).path == folder / "test.jsonl"
    assert resolve_task(folder / "test.jsonl").kind == "general_visual"
    assert resolve_task(loose).name == "loose" and resolve_task(loose).kind is None
    monkeypatch.setenv("FORGETLESS_TASKS", str(tmp_path / "root"))
    assert resolve_task("shapes").path == folder / "test.jsonl"
    with pytest.raises(ForgetlessError, match="no val.jsonl"):
        resolve_task("shapes", split="val")
    with pytest.raises(ForgetlessError, match="not found"):
        resolve_task("nope")


def test_cli_eval_accuracy_matches_hand_count(tmp_path, llama_dir, llama, capsys):
    from forgetless.cli import main

    model, enc = llama
    # multiple choice: the answer is the naive argmax for samples 0 and 2, another option for sample 1
    mc = mc_samples([None, None, None])
    records, expected_mc = [], 0
    with torch.no_grad():
        for i, s in enumerate(mc):
            lps = [naive_option_logprob(model, enc, s, o)[0] for o in s.options]
            best = max(range(len(lps)), key=lambda j: (lps[j], -j))
            answer = s.options[best] if i != 1 else s.options[(best + 1) % len(s.options)]
            expected_mc += answer == s.options[best]
            records.append(
                {"id": s.id, "question": s.turns[0][1], "answer": answer, "options": list(s.options)}
            )
    folder = tmp_path / "tasks" / "quiz"
    folder.mkdir(parents=True)
    write_jsonl(folder / "test.jsonl", records)
    (folder / "task.json").write_text(json.dumps({"name": "quiz", "kind": "downstream", "metric": "mc"}))
    # exact match: the first answer is the greedy output in other case and spacing, the second is wrong
    tok = enc.tokenizer
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    free = []
    with torch.no_grad():
        for q in ("Say something.", "Another question?"):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            text = tok.decode(greedy_loop(model, ids, stops, 3), skip_special_tokens=True).strip()
            free.append((q, text))
    assert all(t for _, t in free)
    up = free[0][1].upper() if free[0][1].upper().casefold() == free[0][1].casefold() else free[0][1]
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"id": "c0", "question": free[0][0], "answer": f"  {up} "},
            {"id": "c1", "question": free[1][0], "answer": free[1][1] + " nope"},
        ],
    )
    base = {
        "split": "test",
        "tasks": {
            "quiz": {"kind": "downstream", "accuracy": 0.0, "n": 3},
            "chat": {"kind": "general_text", "accuracy": 1.0, "n": 2},
        },
    }
    write_json(tmp_path / "base.json", base)
    with pytest.raises(SystemExit):  # intervals are paired: refused before any work
        main(
            [
                "eval",
                str(llama_dir),
                "--tasks",
                "quiz",
                "--task-root",
                str(tmp_path / "tasks"),
                "--base",
                str(tmp_path / "base.json"),
                "--device",
                "cpu",
            ]
        )
    cap = capsys.readouterr()
    assert f"{tmp_path / 'base.json'}: task 'quiz' has no per-item results" in cap.err
    assert "evaluating" not in cap.out
    base["tasks"]["quiz"]["correct_items"], base["tasks"]["chat"]["correct_items"] = "000", "11"
    write_json(tmp_path / "base.json", base)
    out = tmp_path / "res" / "results.json"
    main(
        [
            "eval",
            str(llama_dir),
            "--tasks",
            "quiz",
            "--general",
            str(tmp_path / "chat.jsonl"),
            "--task-root",
            str(tmp_path / "tasks"),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--base",
            str(tmp_path / "base.json"),
            "--device",
            "cpu",
        ]
    )
    res = json.loads(out.read_text())
    quiz, chat = res["tasks"]["quiz"], res["tasks"]["chat"]
    assert (quiz["n"], quiz["correct"], quiz["metric"]) == (3, expected_mc, "mc") and expected_mc == 2
    assert quiz["accuracy"] == pytest.approx(2 / 3)
    assert (chat["n"], chat["correct"], chat["kind"], chat["metric"]) == (2, 1, "general_text", "exact")
    assert [p["prediction"] for p in chat["predictions"]] == [t for _, t in free]
    assert res["scores"]["T"] == pytest.approx(200 / 3) and res["scores"]["G"] == pytest.approx(50.0)
    assert res["comparison"]["E"] == pytest.approx(200 / 3) and res["comparison"]["F"] == pytest.approx(-50.0)
    assert math.isclose(res["comparison"]["E+F"], 200 / 3 - 50)
    assert quiz["correct_items"] == "".join("1" if p["correct"] else "0" for p in quiz["predictions"])
    for key, value in (("E", 200 / 3), ("F", -50.0)):  # paired with the base's items; contains the estimate
        lo, hi = res["comparison_intervals"][key]
        assert lo <= value <= hi
    # the base is right on no quiz item: E's resamples are the model's own accuracy resamples
    assert res["comparison_intervals"]["E"] == pytest.approx(res["intervals"]["T"])


def test_cli_eval_reports_every_metric_with_intervals(tmp_path, llama_dir, llama, capsys):
    """`forgetless eval` on three multiple-choice items whose answer is acc_norm's pick and one exact-match item:
    every metric's per-task counts, scores, intervals and comparison against independent per-option rules."""
    from forgetless.cli import main

    model, enc = llama
    mc = mc_samples([None, None, None])
    records, picks = [], {"acc": [], "acc_norm": [], "lmms_eval_acc": []}
    with torch.no_grad():
        for s in mc:
            lls = [naive_option_logprob(model, enc, s, o)[0] for o in s.options]
            losses = [lmms_eval_loss(model, enc.tokenizer, s.turns[0][1], o) for o in s.options]
            for m in ("acc", "acc_norm"):
                picks[m].append(lm_eval_prediction(lls, s.options, m))
            picks["lmms_eval_acc"].append(int(np.argmin(losses)))
            records.append(
                {
                    "id": s.id,
                    "question": s.turns[0][1],
                    "answer": s.options[picks["acc_norm"][-1]],
                    "options": list(s.options),
                }
            )
    write_jsonl(tmp_path / "quiz.jsonl", records)
    write_jsonl(tmp_path / "chat.jsonl", [{"id": "c0", "question": "Hi?", "answer": "zzz"}])
    right = {m: [p == a for p, a in zip(picks[m], picks["acc_norm"])] for m in picks}
    assert (
        sum(right["acc"]) < sum(right["lmms_eval_acc"]) < sum(right["acc_norm"]) == 3
    )  # the metrics differ here

    def run(out, *extra):
        main(
            [
                "eval",
                str(llama_dir),
                "--tasks",
                str(tmp_path / "quiz.jsonl"),
                "--general",
                str(tmp_path / "chat.jsonl"),
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
                *extra,
            ]
        )
        return json.loads(out.read_text())

    res = run(tmp_path / "base.json")
    quiz, chat = res["tasks"]["quiz"], res["tasks"]["chat"]
    for m, flags in right.items():
        task = quiz if m == "acc" else quiz[m]
        assert task["correct"] == sum(flags) and task["accuracy"] == pytest.approx(sum(flags) / 3)
        assert task["correct_items"] == "".join("1" if f else "0" for f in flags)
        scores_m = res["scores"] if m == "acc" else res[m]["scores"]
        intervals_m = res["intervals"] if m == "acc" else res[m]["intervals"]
        assert (
            scores_m["T"] == pytest.approx(100 * sum(flags) / 3) and scores_m["G"] == 0.0
        )  # exact: same in all
        assert intervals_m["T"][0] <= scores_m["T"] <= intervals_m["T"][1]
        assert intervals_m["T"][0] < intervals_m["T"][1] or sum(flags) in (0, 3)
    assert [p["predicted_index"] for p in quiz["predictions"]] == picks["acc"]
    for m in ("acc_norm", "lmms_eval_acc"):
        assert [p[m]["predicted_index"] for p in quiz["predictions"]] == picks[m]
        assert m not in chat and "comparison" not in res[m]
    with torch.no_grad():
        losses = [lmms_eval_loss(model, enc.tokenizer, s.turns[0][1], o) for s in mc for o in s.options]
    assert [x for p in quiz["predictions"] for x in p["lmms_eval_loss"]] == pytest.approx(losses, abs=1e-5)
    printed = capsys.readouterr().out
    for m in ("acc", "acc_norm", "lmms_eval_acc"):
        assert f"\n{m}: " in printed
    t_acc_norm = printed.split("\nacc_norm: ")[1].splitlines()[3].split()  # its table's row of the model
    assert t_acc_norm[1] == "100.0" and t_acc_norm[3] == "100.0"  # quiz, T

    # against a base (here the same model): every metric's E and F, paired, are 0 exactly
    again = run(tmp_path / "again.json", "--base", str(tmp_path / "base.json"))
    for m in ("acc_norm", "lmms_eval_acc"):
        assert again[m]["comparison"]["E"] == 0.0 and again[m]["comparison_intervals"]["E"] == [0.0, 0.0]
    # a base result without acc_norm (written by an older version): acc_norm gets no comparison, and says so
    old = json.loads((tmp_path / "base.json").read_text())
    for m in ("acc_norm", "lmms_eval_acc"):
        del old["tasks"]["quiz"][m], old[m]
    write_json(tmp_path / "old.json", old)
    capsys.readouterr()
    again = run(tmp_path / "again.json", "--base", str(tmp_path / "old.json"), "--force")
    assert "comparison" in again and "comparison" not in again["acc_norm"]
    assert (
        "(the base result, written by an older version, lacks it: no comparison)" in capsys.readouterr().out
    )


def test_evaluate_checks_before_loading(tmp_path, llama_dir):
    write_jsonl(tmp_path / "t.jsonl", [{"id": "x", "question": "Q", "answer": "A"}])
    save_image(tmp_path / "img.png")
    write_jsonl(tmp_path / "v.jsonl", [{"id": "y", "image": "img.png", "question": "Q", "answer": "A"}])
    (tmp_path / "mc").mkdir()
    write_jsonl(tmp_path / "mc" / "test.jsonl", [{"id": "z", "question": "Q", "answer": "A"}])
    (tmp_path / "mc" / "task.json").write_text(json.dumps({"kind": "downstream", "metric": "mc"}))
    with pytest.raises(ForgetlessError, match="no image processor"):
        evaluate(llama_dir, {"v": tmp_path / "v.jsonl"}, log=None)
    with pytest.raises(ForgetlessError, match="multiple choice") as e:
        evaluate(llama_dir, {"mc": tmp_path / "mc"}, log=None)
    assert str(tmp_path / "mc" / "test.jsonl") in str(e.value)
    with pytest.raises(ForgetlessError, match="config.json"):
        evaluate(tmp_path, {"t": tmp_path / "t.jsonl"}, log=None)


def test_evaluate_llava_folder_kinds_and_accuracy(tmp_path, llava_processor):
    model = tiny_llava_for(llava_processor)
    mdir = tmp_path / "llava"
    model.save_pretrained(mdir)
    llava_processor.save_pretrained(mdir)
    enc = Encoder(llava_processor)
    imgs = [
        save_image(tmp_path / "data" / "a.png", color=(200, 30, 30)),
        None,
        save_image(tmp_path / "data" / "b.png", (40, 32), color=(10, 120, 240)),
    ]
    records, expected = [], 0
    with torch.no_grad():
        for i, s in enumerate(mc_samples(imgs)):
            lps = [naive_option_logprob(model, enc, s, o)[0] for o in s.options]
            best = max(range(len(lps)), key=lambda j: (lps[j], -j))
            answer = s.options[best] if i != 2 else s.options[(best + 1) % len(s.options)]
            expected += answer == s.options[best]
            rec = {"id": s.id, "question": s.turns[0][1], "answer": answer, "options": list(s.options)}
            records.append({**rec, "image": s.image.name} if s.image else rec)
    write_jsonl(tmp_path / "data" / "quiz.jsonl", records)
    write_jsonl(
        tmp_path / "data" / "look.jsonl",
        [{"id": "v", "image": "a.png", "question": "Colour?", "answer": "red", "options": ["red", "blue"]}],
    )
    write_jsonl(tmp_path / "data" / "text.jsonl", [{"id": "t", "question": "Hi?", "answer": "zzz"}])
    res = evaluate(
        mdir,
        {"quiz": tmp_path / "data" / "quiz.jsonl"},
        device="cpu",
        batch_size=2,
        max_new_tokens=2,
        general={"look": tmp_path / "data" / "look.jsonl", "text": tmp_path / "data" / "text.jsonl"},
        log=None,
    )
    quiz = res["tasks"]["quiz"]
    assert (quiz["kind"], quiz["correct"], expected) == ("downstream", 2, 2)
    assert [p["correct"] for p in quiz["predictions"]] == [True, True, False]
    assert res["tasks"]["look"]["kind"] == "general_visual" and res["tasks"]["text"]["kind"] == "general_text"
    assert res["tasks"]["text"]["accuracy"] == 0.0  # a random model does not say "zzz"
    look = 100.0 * res["tasks"]["look"]["accuracy"]
    assert res["scores"] == pytest.approx({"T": 200 / 3, "G_v": look, "G_t": 0.0, "G": look / 2})
