"""`forgetless finetune --replay DATA --replay-ratio R`: general samples mixed into every micro-batch.

Each fact is checked against an independent computation: the micro-batches against the order written out here
(two seeded streams, the replayed ones in the last slots), the recorded items against the same, step 1's loss and
gradient against the model's own per-sample losses of those samples, two DDP ranks against one process.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import dist_worker as W
import pytest
import test_finetune
import test_finetune_distributed as D
import torch
from transformers import LlamaForCausalLM

from forgetless.cli import main
from forgetless.errors import ForgetlessError
from forgetless.stats.data import Encoder, collate, load_samples
from forgetless.train import answer_losses, feed, finetune, loop

torch.set_num_threads(1)
llama_dir, text_data = (
    test_finetune.llama_dir,
    test_finetune.text_data,
)  # fixtures: a 2-layer Llama, 8 QA samples
REPLAY_SEED = 2**32  # documented: the replay stream's epoch e is seeded with seed + 2³² + e
GENERAL = [
    ("What is the sky's colour?", "blue"),
    ("How many legs has a cat?", "four"),
    ("Spell the word dog.", "d o g"),
    ("What do bees make?", "honey, mostly"),
    ("Where is the sun at noon?", "high in the sky, to the south here"),
]


@pytest.fixture(scope="module")
def general(tmp_path_factory) -> Path:
    """Five general samples (ids g0..g4), the last one much longer than any task sample."""
    rows = [{"id": f"g{i}", "question": q, "answer": a} for i, (q, a) in enumerate(GENERAL)]
    rows[-1]["answer"] = " ".join(["and so on"] * 30)
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stream(n: int, seed: int, count: int) -> list[int]:
    """The first ``count`` positions of an endless stream: epoch e a permutation of range(n) seeded with seed + e."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        out += order
        epoch += 1
    return out[:count]


def expected(task, replay, batch: int, replayed: int, seed: int, count: int) -> list[list]:
    """The samples of micro-batches 0 .. count − 1: the task stream's next B − ρ, then the replay stream's next ρ."""
    t = batch - replayed
    ts, rs = stream(len(task), seed, count * t), stream(len(replay), seed + REPLAY_SEED, count * replayed)
    return [
        [task[i] for i in ts[k * t : (k + 1) * t]]
        + [replay[i] for i in rs[k * replayed : (k + 1) * replayed]]
        for k in range(count)
    ]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def collated(enc: Encoder, samples: list) -> dict[str, torch.Tensor]:
    return collate([enc(s) for s in samples], enc.pad_token_id)


def read(llama_dir: Path, text_data: Path, general: Path, seed: int = 0) -> tuple[list, list, Encoder]:
    """The task samples as finetune reads them with ``seed``, the replay samples in file order, the encoder."""
    return load_samples(text_data, seed=seed), load_samples(general, shuffle=False), Encoder(llama_dir)


def mixed(task: list, replay: list, enc: Encoder, **kw) -> feed.Feed:
    """A feed of micro-batches of 4, the last ``replayed`` (default 1) from ``replay``, without workers."""
    return feed.Feed(
        task, enc, on_bad_sample="error", batch_size=4, replay=replay, **{"replayed": 1, "workers": 0, **kw}
    )


# ------------------------------------------------------------------------------------------------ the order
@pytest.mark.parametrize(
    ("ratio", "rank", "world"), [(1 / 3, 0, 1), (1, 0, 1), (1 / 3, 0, 2), (1 / 3, 1, 2), (3, 1, 2)]
)
def test_micro_batches_hold_the_two_streams_samples(llama_dir, text_data, general, ratio, rank, world):
    task, replay, enc = read(llama_dir, text_data, general, seed=4)
    count, replayed = 7, round(4 * ratio / (1 + ratio))  # 7 micro-batches of 4: several epochs of each stream
    want = expected(task, replay, 4, replayed, 4, count)
    assert sum(s.id.startswith("g") for s in want[0]) == replayed
    for workers in (0, 2):
        f = mixed(
            task,
            replay,
            enc,
            micro_batches=count,
            seed=4,
            rank=rank,
            world=world,
            workers=workers,
            replayed=replayed,
        )
        got = list(f.batches())
        assert len(got) == count
        for k, (g, w) in enumerate(zip(got, want)):
            assert same(g, collated(enc, w[rank::world])), (workers, k)
        assert f.replayed_items() == {"items": [s.id for w in want for s in w[4 - replayed :]]}


def test_without_replay_the_task_stream_fills_every_slot(llama_dir, text_data):
    task, enc = load_samples(text_data), Encoder(llama_dir)
    f = feed.Feed(task, enc, on_bad_sample="error", batch_size=4, micro_batches=5, seed=1, workers=0)
    want = expected(task, [], 4, 0, 1, 5)
    assert all(same(g, collated(enc, w)) for g, w in zip(f.batches(), want))
    assert f.replay is None and f.replayed_items() == {}


def test_the_ranks_check_each_replay_sample_once(llama_dir, text_data, general):
    """Each rank encodes up front the replay samples its slots take in the first epoch; together, every one once."""
    task, replay, enc = read(llama_dir, text_data, general)
    kept = []
    for rank in (0, 1):
        f = mixed(task, replay, enc, micro_batches=5, rank=rank, world=2)
        kept += sorted(f.replay.cache)
        taken = {i for k in range(5) for i in f.dataset.items(k, source=1)}  # the first epoch: 5 of 5
        assert set(f.replay.cache) == taken
    assert sorted(kept) == list(range(len(replay)))


def test_many_replayed_items_are_recorded_as_counts(llama_dir, text_data, general, monkeypatch):
    monkeypatch.setattr(feed, "MAX_LISTED", 6)
    task, replay, enc = read(llama_dir, text_data, general)
    f = mixed(task, replay, enc, micro_batches=7)
    ids = [s.id for w in expected(task, replay, 4, 1, 0, 7) for s in w[3:]]
    assert f.replayed_items() == {"counts": {i: ids.count(i) for i in dict.fromkeys(ids)}}


# ------------------------------------------------------------------------------------------------ the training
def test_step_one_is_the_mean_over_task_and_replayed_samples(tmp_path, llama_dir, text_data, general):
    """Step 1's recorded loss and its gradient are those of the mean per-sample loss over the 8 samples of its two
    micro-batches (2 task + 2 replayed each), computed here from the stored model; finetune.json lists the replayed
    samples of the run, in order."""
    kw = {"steps": 2, "batch_size": 4, "grad_accum": 2, "seed": 3, "clip": None, "lr": 1e-3}
    grads: dict[str, torch.Tensor] = {}

    def keep_first(info) -> None:
        if info.step == 1:
            grads.update({n: g.clone() for n, g in info.grads.items()})

    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "out",
        train=["language.layers[1]"],
        replay=general,
        replay_ratio=1,
        hook=keep_first,
        log=test_finetune.quiet,
        **kw,
    )
    task, replay, enc = read(llama_dir, text_data, general, seed=3)
    want = expected(task, replay, 4, 2, 3, 4)  # 2 steps × 2 micro-batches
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    per_sample = torch.cat([answer_losses(model, collated(enc, w)) for w in want[:2]])
    per_sample.mean().backward()
    assert report.losses[0] == pytest.approx(per_sample.mean().item(), rel=1e-6)
    named = dict(model.named_parameters())
    assert grads.keys() and all(
        torch.allclose(g, named[n].grad, rtol=1e-5, atol=1e-8) for n, g in grads.items()
    )
    meta = json.loads((tmp_path / "out" / "finetune.json").read_text())
    rec = meta["replay"]
    assert rec["items"] == [s.id for w in want for s in w[2:]]
    assert (rec["data"], rec["ratio"], rec["per_batch"], rec["num_samples"]) == (str(general), 1, 2, 5)
    assert rec["seed"] == 3 + REPLAY_SEED and rec["skipped"] == [] and len(rec["data_fingerprint"]) == 16
    assert (meta["recipe"]["replay"], meta["recipe"]["replay_ratio"]) == (str(general), 1)
    assert meta["num_samples"] == 8 and meta["data_fingerprint"] != rec["data_fingerprint"]


def test_replay_runs_are_reproducible_and_a_run_without_is_unchanged(tmp_path, llama_dir, text_data, general):
    kw = {
        "train": ["language.layers[1]"],
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-2,
        "log": test_finetune.quiet,
    }
    runs = {
        name: finetune(llama_dir, text_data, tmp_path / name, **kw, **extra)
        for name, extra in [
            ("a", {"replay": general, "replay_ratio": 1}),
            ("b", {"replay": general, "replay_ratio": 1}),
            ("plain", {}),
        ]
    }
    weights = {name: test_finetune.tensors(tmp_path / name) for name in runs}
    assert runs["a"].losses == runs["b"].losses and all(
        torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"]
    )
    assert runs["plain"].losses != runs["a"].losses
    plain = json.loads((tmp_path / "plain" / "finetune.json").read_text())
    assert (
        plain["replay"] is None
        and plain["recipe"]["replay"] is None
        and plain["recipe"]["replay_ratio"] is None
    )
    # the run without replay trains on the task stream alone: step 1's loss is its first 4 samples' mean
    task, enc = load_samples(text_data), Encoder(llama_dir)
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    first = expected(task, [], 4, 0, 0, 1)[0]
    with torch.no_grad():
        loss = answer_losses(model, collated(enc, first)).mean().item()
    assert plain["losses"][0] == pytest.approx(loss, rel=1e-6)


def test_dry_run_accounts_the_longest_replayed_sample(tmp_path, llama_dir, text_data, general, monkeypatch):
    seen: list[int] = []
    account = loop.account

    def spy(*a, **kw):
        seen.append(kw["tokens"])
        return account(*a, **kw)

    monkeypatch.setattr(loop, "account", spy)
    for extra in ({}, {"replay": general, "replay_ratio": 1}):
        finetune(llama_dir, text_data, tmp_path / "dry", batch_size=4, dry_run=True, log=None, **extra)
    enc = Encoder(llama_dir)
    longest = [max(enc(s)["input_ids"].numel() for s in load_samples(p)) for p in (text_data, general)]
    assert seen == [4 * longest[0], 4 * max(longest)] and longest[1] > longest[0]


# ------------------------------------------------------------------------------------------------ refusals
def test_a_ratio_not_exact_for_the_batch_is_refused_naming_the_nearest(
    tmp_path, llama_dir, text_data, general
):
    with pytest.raises(ForgetlessError, match=r"puts 2\.667 replayed samples in each micro-batch of 4") as e:
        finetune(
            llama_dir, text_data, tmp_path / "out", batch_size=4, replay=general, replay_ratio=2, log=None
        )
    assert "--replay-ratio 1 (2 of 4 replayed) or 3 (3 of 4 replayed)" in e.value.remedy
    with pytest.raises(ForgetlessError) as e:
        finetune(
            llama_dir, text_data, tmp_path / "out", batch_size=4, replay=general, replay_ratio=0.1, log=None
        )
    assert "--replay-ratio 0.333333333333 (1 of 4 replayed)," in e.value.remedy
    assert feed.ratio_problem(4, 0.333333333333) is None  # the named ratio passes
    assert feed.ratio_problem(8, 0.6) is None and feed.ratio_problem(8, 0.5) is not None  # 3 of 8; 8/3 of 8
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"replay_ratio": 1}, "--replay-ratio is the share of --replay samples"),
        ({"replay": "GENERAL"}, "--replay needs --replay-ratio"),
        ({"replay_images": "IMAGES"}, "--replay-images is the image folder of --replay"),
        ({"replay": "GENERAL", "replay_ratio": 0}, "must be a positive number, got 0"),
        ({"replay": "GENERAL", "replay_ratio": 1, "batch_size": 1}, "a micro-batch of 1 sample cannot mix"),
        ({"replay": "MISSING", "replay_ratio": 1}, "calibration data file not found"),
        ({"replay": "OUT", "replay_ratio": 1}, "--out is an input"),
    ],
)
def test_replay_options_are_refused_before_any_work(
    tmp_path, llama_dir, text_data, general, monkeypatch, options, words
):
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model was loaded"))
    paths = {
        "GENERAL": general,
        "IMAGES": general.parent,
        "MISSING": tmp_path / "nope.jsonl",
        "OUT": tmp_path / "out",
    }
    kw = {"batch_size": 2, **{k: paths.get(v, v) for k, v in options.items()}}
    with pytest.raises(ForgetlessError, match=re.escape(words)):
        finetune(llama_dir, text_data, tmp_path / "out", log=None, **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("on_bad_sample", ["error", "skip"])
def test_replay_data_without_a_usable_sample_is_refused(
    tmp_path, llama_dir, text_data, monkeypatch, on_bad_sample
):
    bad = tmp_path / "blank.jsonl"
    bad.write_text(
        "".join(
            json.dumps({"id": f"b{i}", "question": "Say nothing?", "answer": " "}) + "\n" for i in range(3)
        )
    )
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model was loaded"))
    words = "sample 'b0': empty answer" if on_bad_sample == "error" else "all 3 samples were skipped as bad"
    with pytest.raises(ForgetlessError, match=words) as e:
        finetune(
            llama_dir,
            text_data,
            tmp_path / "out",
            batch_size=2,
            replay=bad,
            replay_ratio=1,
            on_bad_sample=on_bad_sample,
            log=None,
        )
    assert Path(e.value.file) == bad and not (tmp_path / "out").exists()


def test_bad_replay_samples_are_skipped_and_recorded(tmp_path, llama_dir, text_data, general):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        general.read_text() + json.dumps({"id": "blank", "question": "Say nothing?", "answer": " "}) + "\n"
    )
    said: list[str] = []
    finetune(
        llama_dir,
        text_data,
        tmp_path / "out",
        steps=1,
        batch_size=2,
        replay=mixed,
        replay_ratio=1,
        on_bad_sample="skip",
        log=said.append,
    )
    rec = json.loads((tmp_path / "out" / "finetune.json").read_text())["replay"]
    assert rec["skipped"] == [["blank", "empty answer (turn 1)"]] and rec["num_samples"] == 5
    assert "  skipped blank: empty answer (turn 1)" in said and any(
        s.startswith("  replay: 5 samples") for s in said
    )


# ------------------------------------------------------------------------------------------------ 2 ranks
def test_two_ranks_with_replay_give_the_single_process_run(tmp_path, llama_dir, text_data, general):
    """Batch 4 (2 replayed) × accumulation 2 on 2 DDP ranks: each rank one task and one replayed sample of every
    micro-batch; the weights, losses and gradient norms are one process's, the replayed items the same."""
    extra = ("--lr", "1e-2", "--replay", str(general), "--replay-ratio", "1")
    main(D.finetune_args(llama_dir, text_data, tmp_path / "one", *extra))
    W.torchrun("cli", tmp_path / "probe", *D.finetune_args(llama_dir, text_data, tmp_path / "two", *extra))
    one, two = D.compare_runs(tmp_path, "model.safetensors")
    assert two["replay"] == one["replay"] and len(one["replay"]["items"]) == 3 * 2 * 2
