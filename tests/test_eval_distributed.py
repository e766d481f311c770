"""`forgetless eval` under torchrun (2 CPU ranks, gloo): each rank scores its share of the items, rank 0 gathers
them and alone writes; the result is one process's — the same per-item correctness, predictions and intervals."""

from __future__ import annotations

import json

import dist_worker as W
import pytest
from conftest import build_llama_with_tokenizer
from test_stats_data import write_jsonl

from forgetless.cli import main
from forgetless.eval.harness import shard_by_length
from forgetless.stats.data import Sample

QUESTIONS = [
    "Which is a colour?",
    "Pick the animal that barks loudly at night near the house:",
    "2 + 2 =",
    "Which planet is the largest one in our solar system, by far?",
    "Opposite of hot?",
    "Which word names a fruit?",
    "H2O is?",
    "The capital of France is",
    "Which one is a number?",
]
OPTIONS = [
    ["red", "car"],
    ["dog", "cat", "fish"],
    ["4", "5"],
    ["Jupiter", "Mars", "Venus"],
    ["cold", "warm"],
    ["apple", "chair"],
    ["water", "salt"],
    ["Paris", "Rome", "Oslo"],
    ["seven", "blue"],
]


def test_items_are_shared_by_length_and_each_once():
    samples = [
        Sample(str(i), None, [("user", "x" * n)], options=("a", "b"))
        for i, n in enumerate([50, 1, 2, 40, 3, 30, 4])
    ]
    shares = [shard_by_length(samples, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(7))
    assert all(s == sorted(s) for s in shares)  # file order within a rank
    assert [sum(i in s for i in (0, 3, 5)) for s in shares] == [1, 1, 1]  # the three longest on three ranks
    assert shard_by_length(samples, 0, 1) == list(range(7))


def test_eval_under_torchrun_gives_the_one_process_result(tmp_path):
    model = build_llama_with_tokenizer(tmp_path / "llama", layers=2, tie=False)
    quiz = write_jsonl(
        tmp_path / "quiz.jsonl",
        [
            {"id": f"q{i}", "question": q, "answer": o[0], "options": o}
            for i, (q, o) in enumerate(zip(QUESTIONS, OPTIONS))
        ],
    )
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"id": f"c{i}", "question": q, "answer": "yes"} for i, q in enumerate(QUESTIONS[:5])],
    )
    args = [
        "eval",
        str(model),
        "--tasks",
        str(quiz),
        "--general",
        str(chat),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    main([*args, "--out", str(tmp_path / "one.json")])
    ends = W.torchrun("cli", tmp_path / "probe", *args, "--out", str(tmp_path / "two.json"), timeout=300)
    assert ends == [0]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for name in ("quiz", "chat"):
        a, b = one["tasks"][name], two["tasks"][name]
        assert (b["n"], b["correct"], b["correct_items"]) == (a["n"], a["correct"], a["correct_items"])
        assert b["item_fingerprints"] == a["item_fingerprints"]
        for p, q in zip(a["predictions"], b["predictions"]):
            assert (q["id"], q["correct"]) == (p["id"], p["correct"])
            if (
                "logprobs" in p
            ):  # other batch companions: the same scores to rounding (top-2 gaps here ≥ 2.7e-3)
                assert (q["prediction"], q["predicted_index"]) == (p["prediction"], p["predicted_index"])
                assert q["logprobs"] == pytest.approx(p["logprobs"], rel=1e-5, abs=1e-5)
    assert two["scores"] == one["scores"] and two["intervals"] == one["intervals"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["one.json", "two.json"]
