"""`forgetless finetune`'s data pipeline (:mod:`forgetless.train.feed`): samples checked up front, each rank its
share, and micro-batches encoded off the loop by a DataLoader.

- The batches, whatever the number of loader workers, are the ones the sample order defines (the endless seeded
  stream, each rank its ``[rank::world]`` of every micro-batch), rebuilt here from that definition, bit for bit;
  a fine-tune with 0 and with 2 workers gives the same losses and weights, and leaves no worker behind.
- Each rank encodes only its share before the first step; the shares cover the samples once.
- On 2 gloo ranks (torchrun), with a bad sample in rank 1's share: ``skip`` gives one process's run (the same
  samples skipped and trained on), ``error`` stops both ranks with one process's error before any step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import dist_worker as W
import pytest
import test_finetune
import test_finetune_distributed as D
import torch

from forgetless.errors import ForgetlessError
from forgetless.stats.data import Encoder, collate, load_samples
from forgetless.train import feed, finetune

torch.set_num_threads(1)
llava_dir, image_data = (
    test_finetune.llava_dir,
    test_finetune.image_data,
)  # fixtures: tiny LLaVA, 4 colour images
llama_dir, text_data = test_finetune.llama_dir, test_finetune.text_data  # a 2-layer Llama, 8 QA samples
BAD_ID = "blank"


def expected_batches(
    samples, enc: Encoder, batch_size: int, seed: int, rank: int, world: int, count: int
) -> list:
    """The micro-batches as the order defines them: epoch e a permutation seeded with seed + e, micro-batch k the
    stream's items k·B .. (k+1)·B − 1, this rank's [rank::world] of it, each sample encoded afresh."""
    stream: list[int] = []
    for epoch in range(count * batch_size // len(samples) + 1):
        order = list(range(len(samples)))
        random.Random(seed + epoch).shuffle(order)
        stream += order
    shares = [stream[k * batch_size : (k + 1) * batch_size][rank::world] for k in range(count)]
    return [collate([enc(samples[i]) for i in mine], enc.pad_token_id) for mine in shares]


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_batches_are_the_orders_whatever_the_workers(llava_dir, image_data, monkeypatch, rank, world):
    samples, enc = load_samples(image_data), Encoder(llava_dir)
    count = 6  # 3 epochs of the 4 samples at 2 per micro-batch
    want = expected_batches(samples, enc, 2, 5, rank, world, count)
    assert "pixel_values" in want[0]
    for workers, cache in [
        (0, feed.CACHE_BYTES),
        (0, 0),
        (2, 0),
    ]:  # cache 0: every sample encoded in the loader
        monkeypatch.setattr(feed, "CACHE_BYTES", cache)
        f = feed.Feed(
            samples,
            enc,
            on_bad_sample="error",
            batch_size=2,
            micro_batches=count,
            seed=5,
            rank=rank,
            world=world,
            workers=workers,
        )
        got = list(f.batches())
        assert_same_batches(got, want)
        # through a worker, a batch's tensors come in shared memory
        assert all(t.is_shared() == (workers > 0) for b in got for t in b.values()), workers
    assert multiprocessing.active_children() == []


def test_finetune_with_two_workers_gives_the_same_steps(tmp_path, llava_dir, image_data, monkeypatch):
    monkeypatch.setattr(feed, "CACHE_BYTES", 0)  # nothing kept: the workers encode every sample of the loop
    kw = {"steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "seed": 1, "log": test_finetune.quiet}
    ref = finetune(llava_dir, image_data, tmp_path / "w0", workers=0, **kw)
    two = finetune(llava_dir, image_data, tmp_path / "w2", workers=2, **kw)
    assert multiprocessing.active_children() == []  # the workers ended with the run
    assert two.losses == ref.losses and two.grad_norms == ref.grad_norms
    a, b = test_finetune.tensors(tmp_path / "w0"), test_finetune.tensors(tmp_path / "w2")
    assert all(torch.equal(a[n], b[n]) for n in a)
    recipes = [json.loads((tmp_path / d / "finetune.json").read_text())["recipe"] for d in ("w0", "w2")]
    assert [r["workers"] for r in recipes] == [0, 2]


class Counting:
    """An encoder that records the ids it encodes."""

    def __init__(self, enc: Encoder) -> None:
        self.enc, self.seen = enc, []
        self.pad_token_id = enc.pad_token_id

    def __call__(self, sample):
        self.seen.append(sample.id)
        return self.enc(sample)


def test_each_rank_encodes_only_its_share_up_front(llama_dir, text_data):
    samples, enc = load_samples(text_data, seed=2), Encoder(llama_dir)
    first_epoch = set()
    seen = []
    for rank in (0, 1):
        counting = Counting(enc)
        f = feed.Feed(
            samples,
            counting,
            on_bad_sample="error",
            batch_size=4,
            micro_batches=2,
            seed=2,
            rank=rank,
            world=2,
            workers=0,
        )
        seen.append(counting.seen)
        mine = {i for k in range(2) for i in f.dataset.items(k)}  # the first epoch: 2 micro-batches of 4 of 8
        assert {samples[i].id for i in mine} == set(counting.seen)  # the samples it will take, no other
        assert mine <= f.cache.keys() and f.workers == 0  # all kept encoded: nothing to encode in the loop
        first_epoch |= mine
    assert sorted(seen[0] + seen[1]) == sorted(s.id for s in samples)  # every sample checked once
    assert first_epoch == set(range(len(samples)))


def test_an_unexpected_failure_on_one_rank_stops_the_other_naming_it(llama_dir, text_data, monkeypatch):
    samples, enc = load_samples(text_data), Encoder(llama_dir)
    victim = samples[feed.share(len(samples), 0, 1, 2)[0]].id

    def breaking(sample):
        if sample.id == victim:
            raise ValueError("processor broke")
        return enc(sample)

    breaking.pad_token_id = enc.pad_token_id
    theirs, _, _ = feed.check_share(samples, breaking, "error", feed.share(len(samples), 0, 1, 2), rank=1)
    monkeypatch.setattr(feed, "gather_objects", lambda mine: [mine, theirs])  # rank 0's view of the gather
    with pytest.raises(
        ForgetlessError,
        match=f"rank 1 failed to encode sample '{victim}' "
        r"\(ValueError: processor broke\)",
    ):
        feed.check(samples, breaking, "error", rank=0, world=2)
    monkeypatch.setattr(feed, "gather_objects", lambda mine: [feed.Findings(), mine])  # rank 1's own view
    with pytest.raises(ValueError, match="processor broke"):  # its own exception, traceback and all
        feed.check(samples, breaking, "error", rank=1, world=2)


# ------------------------------------------------------------------------------------------------ 2 ranks
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """The 8 QA samples and one with a blank answer, placed where rank 1 of 2 checks it (seed 0)."""
    path = tmp_path_factory.mktemp("bad") / "train.jsonl"
    for where in range(len(test_finetune.QA) + 1):
        rows = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(test_finetune.QA)]
        rows.insert(where, {"id": BAD_ID, "question": "Say nothing?", "answer": "  "})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        position = [s.id for s in load_samples(path)].index(BAD_ID)
        if position in feed.share(len(rows), 0, 1, 2):
            return path
    raise AssertionError("no place puts the bad sample in rank 1's share")


def test_two_ranks_skip_the_bad_sample_one_process_skips(tmp_path, llama_dir, bad_data):
    from forgetless.cli import main

    extra = ("--lr", "1e-2", "--on-bad-sample", "skip")
    main(D.finetune_args(llama_dir, bad_data, tmp_path / "one", *extra))
    W.torchrun(
        "cli",
        tmp_path / "probe",
        *D.finetune_args(llama_dir, bad_data, tmp_path / "two", *extra, "--workers", "1"),
    )
    one, two = D.compare_runs(tmp_path, "model.safetensors")  # the same losses, gradient norms and weights
    assert (
        two["skipped"] == one["skipped"] == [[BAD_ID, "empty answer (turn 1)"]]
    )  # rank 0 learnt it from rank 1
    assert (
        two["num_samples"] == one["num_samples"] == 8 and two["data_fingerprint"] == one["data_fingerprint"]
    )
    assert two["recipe"]["workers"] == 1


def test_two_ranks_stop_on_a_bad_sample_of_one_with_one_process_error(tmp_path, llama_dir, bad_data):
    with pytest.raises(ForgetlessError) as one:
        finetune(llama_dir, bad_data, tmp_path / "one", steps=1, log=None)
    assert f"sample {BAD_ID!r}: empty answer" in str(one.value)
    args = D.finetune_args(llama_dir, bad_data, tmp_path / "two")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        W.__file__,
        "cli",
        str(tmp_path / "probe"),
        *args,
    ]
    r = subprocess.run(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # a rank left waiting on its peer would time out here
    assert r.returncode != 0
    assert r.stderr.count(f"error: {one.value}\n") == 2, r.stderr[-3000:]  # both ranks, one process's words
    assert "step 1/" not in r.stdout and not (tmp_path / "two").exists()
