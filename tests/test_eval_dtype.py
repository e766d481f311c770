"""The dtype an evaluation ran in is part of its result and of its cache key: a bf16 score is never read back for
a float32 evaluation (or the reverse), and float32's cache keys are those earlier versions wrote."""

from __future__ import annotations

import hashlib
import json

from conftest import build_llama_with_tokenizer
from test_stats_data import write_jsonl

from forgetless.eval.cache import EVAL_VERSION, _task_digest, cached_evaluate, weights_digest


def test_cache_keeps_dtypes_apart_and_float32_keys_unchanged(tmp_path):
    model = build_llama_with_tokenizer(tmp_path / "llama", layers=1, tie=False)
    quiz = write_jsonl(
        tmp_path / "quiz.jsonl", [{"id": "q0", "question": "2 + 2 =", "answer": "4", "options": ["4", "5"]}]
    )
    cache = tmp_path / "cache"
    r32, hit32 = cached_evaluate(model, {"quiz": quiz}, None, cache_dir=cache, device="cpu", log=None)
    old_key = json.dumps(
        {
            "v": EVAL_VERSION,
            "w": weights_digest(model),
            "split": "test",
            "name": "quiz",
            "group": 0,
            "t": _task_digest(quiz, "test", cache),
            "limit": None,
        },
        sort_keys=True,
    )
    assert [p.name for p in cache.iterdir()] == [f"{hashlib.sha256(old_key.encode()).hexdigest()[:24]}.json"]
    r16, hit16 = cached_evaluate(
        model, {"quiz": quiz}, None, cache_dir=cache, dtype="bfloat16", device="cpu", log=None
    )
    assert not hit32 and not hit16 and len(list(cache.iterdir())) == 2
    assert (r32["dtype"], r16["dtype"]) == ("float32", "bfloat16")
    again, hit = cached_evaluate(
        model, {"quiz": quiz}, None, cache_dir=cache, dtype="bfloat16", device="cpu", log=None
    )
    assert hit and again["tasks"] == r16["tasks"]
