"""The benchmark plumbing (forgetless.eval.benchmarks + eval): a benchmark's units, graded per-unit values, the
headline and its interval against a brute-force bootstrap, the paired change against a base, --limit by units,
unit fingerprints, and the refusals — on a made-up benchmark registered for the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from forgetless.cli import cli
from forgetless.errors import ForgetlessError
from forgetless.eval import benchmarks as B
from forgetless.eval.metrics import Bootstrap, item_correct
from forgetless.eval.report import run_eval

QUESTIONS = [  # (unit, question, the words that count): two units of two questions, one of one
    ("u1", "What colour is it?", ["red", "blue"]),
    ("u1", "Is it round?", ["yes"]),
    ("u2", "How many?", ["one", "two", "three"]),
    ("u2", "Which side?", ["left"]),
    ("u3", "Name it.", ["shape"]),
]


def _read(folder: Path) -> list[B.Item]:
    rows = json.loads(B.need_file(folder, "qa.json").read_text())
    return [
        B.Item(
            id=r["id"],
            image=(folder / r["image"]).resolve(),
            turns=[("user", r["question"] + "\nAnswer briefly."), ("assistant", r["words"][0])],
            unit=r["unit"],
            meta={"words": r["words"]},
        )
        for r in rows
    ]


def _graded(item: B.Item, text: str) -> float:
    """A made-up graded rule: the share of the item's words found in the answer."""
    return sum(w in text.lower() for w in item.meta["words"]) / len(item.meta["words"])


def _score(items: list[B.Item], predictions: list[str]) -> B.Scored:
    per = B.by_unit(items, [_graded(it, p) for it, p in zip(items, predictions)])
    values = [sum(v) / len(v) + 0.25 for v in per.values()]  # graded, and not bounded by 1
    return B.Scored(
        values, [_graded(it, p) == 1 for it, p in zip(items, predictions)], {"units": len(values)}
    )


FAKE = B.Benchmark(
    "fake", "a made-up benchmark", _read, _score, "made-up score", scale=10.0, max_new_tokens=3
)


@pytest.fixture
def fake(monkeypatch):
    B._load_all()
    monkeypatch.setitem(B.REGISTRY, "fake", FAKE)
    return FAKE


def write_fake(folder: Path, questions=QUESTIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "a.png")
    rows = [
        {"id": f"q{i}", "image": "a.png", "unit": u, "question": q, "words": w}
        for i, (u, q, w) in enumerate(questions)
    ]
    (folder / "qa.json").write_text(json.dumps(rows))
    return folder


def test_headline_interval_and_base_change_against_brute_force(tmp_path, fake, llava_eval_dir):
    data = write_fake(tmp_path / "fake")
    res = run_eval(
        llava_eval_dir, None, None, benchmarks=[("fake", data)], device="cpu", progress=False, log=None
    )
    entry, official = res["tasks"]["fake"], res["benchmarks"]["fake"]
    items = _read(data)
    texts = [p["prediction"] for p in entry["predictions"]]
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)  # one generated answer per question
    assert entry["n"] == 3 and entry["n_questions"] == 5
    want = _score(items, texts).values  # the recorded answers scored again
    assert entry["item_scores"] == pytest.approx(want, abs=0)
    assert entry["accuracy"] == pytest.approx(np.mean(want), rel=1e-12)
    assert official["value"] == pytest.approx(10 * np.mean(want), rel=1e-12) and official["units"] == 3
    idx = Bootstrap().indices("fake", 3)  # the brute-force bootstrap: resample the units, mean, percentiles
    lo, hi = np.percentile(np.asarray(want)[idx].mean(axis=1), [2.5, 97.5])
    assert official["interval"] == pytest.approx([10 * lo, 10 * hi], rel=1e-12)
    assert res["scores"]["G_v"] == pytest.approx(100 * np.mean(want), rel=1e-12)

    base = tmp_path / "base.json"
    (base).write_text(json.dumps({**res, "path": str(base)}))
    again = run_eval(
        llava_eval_dir,
        None,
        None,
        benchmarks=[("fake", data)],
        base=base,
        device="cpu",
        progress=False,
        log=None,
    )
    assert again["benchmarks"]["fake"]["vs_base"] == {"value": 0.0, "interval": [0.0, 0.0]}
    assert again["comparison"]["F"] == 0.0


def test_limit_keeps_whole_units_and_fingerprints_follow_the_questions(tmp_path, fake, llava_eval_dir):
    data = write_fake(tmp_path / "fake")
    res = run_eval(
        llava_eval_dir,
        None,
        None,
        benchmarks=[("fake", data)],
        limit=2,
        device="cpu",
        progress=False,
        log=None,
    )
    entry = res["tasks"]["fake"]
    assert (entry["n"], entry["n_questions"]) == (2, 4)  # units u1 and u2, each whole
    assert [p["unit"] for p in entry["predictions"]] == ["u1", "u1", "u2", "u2"]

    changed = write_fake(
        tmp_path / "other", [*QUESTIONS[:3], ("u2", "Which side now?", ["left"]), QUESTIONS[4]]
    )
    from forgetless.eval.harness import benchmark_spec, task_fingerprints

    a = task_fingerprints(benchmark_spec("fake", data), None)
    b = task_fingerprints(benchmark_spec("fake", changed), None)
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1] and a[2] == b[2]

    base = tmp_path / "base.json"
    base.write_text(json.dumps({**res, "path": str(base)}))
    with pytest.raises(ForgetlessError, match="other items"):
        run_eval(
            llava_eval_dir,
            None,
            None,
            benchmarks=[("fake", changed)],
            limit=2,
            base=base,
            progress=False,
            log=None,
        )


def test_graded_values_are_what_intervals_resample():
    task = {"item_scores": [0.5, 1.25, 0.0], "correct_items": "010"}
    assert item_correct(task).tolist() == [0.5, 1.25, 0.0]  # graded values win over any 0/1 string
    boot = Bootstrap(n_boot=50)
    idx = boot.indices("t", 3)
    assert boot.task("t", task) == pytest.approx(np.array([0.5, 1.25, 0.0])[idx].mean(axis=1), abs=0)


def test_refusals_before_any_model_work(tmp_path, fake):
    def run(*args):
        r = CliRunner().invoke(*args)
        return r.exit_code, r.output + str(r.exception)

    nowhere = str(tmp_path / "no-model")
    code, out = run(cli, ["eval", nowhere, "--benchmark", "fake"])
    assert code != 0 and "--benchmark-dir" in out
    code, out = run(cli, ["eval", nowhere, "--benchmark", "nope", "--benchmark-dir", str(tmp_path)])
    assert code != 0 and "unknown benchmark 'nope'" in out and "fake" in out
    code, out = run(
        cli, ["eval", nowhere, "--benchmark", "fake", "--benchmark-dir", str(tmp_path / "missing")]
    )
    assert code != 0 and "does not exist" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgetlessError, match="no qa.json") as e:
        _read(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_decoded_images_are_written_once_by_content(tmp_path):
    data = b"\x89PNG not really"
    p = B.decoded_image(data, tmp_path / "cache")
    assert p.read_bytes() == data and p.parent == tmp_path / "cache"
    mtime = p.stat().st_mtime_ns
    assert B.decoded_image(data, tmp_path / "cache") == p and p.stat().st_mtime_ns == mtime
    assert B.decoded_image(data + b"!", tmp_path / "cache") != p
