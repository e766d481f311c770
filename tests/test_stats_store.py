"""Statistics files (round trip, refusals, metadata, atomic writes) and data-parallel accumulation (2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llava, tiny_llava_model
from safetensors.torch import load_file
from test_stats_fisher import collate, llava_samples

import forgetless
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.errors import ForgetlessError
from forgetless.stats.distributed import all_reduce_sums, dist_info, finish_distributed, shard_samples
from forgetless.stats.fisher import accumulate_fisher
from forgetless.stats.gram import accumulate_gram
from forgetless.stats.store import (
    load_statistics,
    model_fingerprints,
    save_fisher,
    save_gram,
    save_statistics,
)

TESTS = Path(__file__).parent


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.rand(4, 3, generator=g) * 1e-30, "b.weight": torch.rand(5, generator=g)}


def _meta(**kw):
    return {"kind": "fisher", "num_samples": 7, "model_fingerprint": "abc", "data_fingerprint": "d1", **kw}


def test_round_trip_float32_keeps_values_and_metadata(tmp_path):
    t = _tensors()
    p = save_statistics(
        tmp_path / "f.safetensors", t, **_meta(), extra={"variant": "empirical", "skipped": []}
    )
    reader, meta = load_statistics(p)
    with reader:
        assert set(reader.names()) == set(t)
        for k, v in t.items():
            got = reader.get(k)
            assert got.dtype == torch.float32 and torch.equal(got, v)
    assert meta["kind"] == "fisher" and meta["num_samples"] == 7
    assert meta["model_fingerprint"] == "abc" and meta["data_fingerprint"] == "d1"
    assert meta["forgetless_version"] == forgetless.__version__
    assert meta["extra"] == {"variant": "empirical", "skipped": []}
    assert [f.name for f in tmp_path.iterdir()] == ["f.safetensors"]  # no temporary file left


def test_bfloat16_option_and_float16_refused(tmp_path):
    t = _tensors()
    p = save_statistics(tmp_path / "b.safetensors", t, **_meta(), dtype="bf16")
    got = load_file(str(p))
    assert got["a.weight"].dtype == torch.bfloat16
    assert torch.allclose(got["a.weight"].float(), t["a.weight"], rtol=1e-2)
    assert (got["a.weight"] != 0).all()  # 1e-30 survives in bf16 (it would be 0 in fp16)
    for bad in (torch.float16, "float16", torch.float64):
        with pytest.raises(ForgetlessError, match="float16|cannot be stored"):
            save_statistics(tmp_path / "h.safetensors", t, **_meta(), dtype=bad)
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_statistics_are_never_written(tmp_path, value):
    p = tmp_path / "f.safetensors"
    save_statistics(p, _tensors(), **_meta())
    before = p.read_bytes()
    t = _tensors()
    t["b.weight"][2] = value
    with pytest.raises(ForgetlessError, match=r"b\.weight.*NaN or Inf"):
        save_statistics(p, t, **_meta())
    assert p.read_bytes() == before  # the old file is untouched
    assert len(list(tmp_path.iterdir())) == 1


def test_fisher_file_holds_the_mean_and_gram_file_the_sum_with_counts(tmp_path):
    sums = {"w": torch.full((2, 2), 6.0)}
    p = save_fisher(tmp_path / "f.safetensors", sums, 3, model_fingerprint="m", data_fingerprint="d")
    assert torch.equal(load_file(str(p))["w"], torch.full((2, 2), 2.0))
    grams = {"w": torch.eye(3, dtype=torch.float64) * 5}
    p = save_gram(
        tmp_path / "g.safetensors", grams, {"w": 11}, 4, model_fingerprint="m", data_fingerprint="d"
    )
    reader, meta = load_statistics(p)
    assert meta["kind"] == "gram" and meta["token_counts"] == {"w": 11} and meta["num_samples"] == 4
    assert torch.equal(reader.get("w"), torch.eye(3) * 5)
    with pytest.raises(ForgetlessError, match="no token count"):
        save_gram(tmp_path / "g2.safetensors", grams, {}, 4, model_fingerprint="m", data_fingerprint="d")
    with pytest.raises(ForgetlessError, match="undefined"):
        save_fisher(tmp_path / "f0.safetensors", sums, 0, model_fingerprint="m", data_fingerprint="d")


def test_not_a_statistics_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ForgetlessError, match="not a forgetless statistics file"):
        load_statistics(tmp_path / "x.safetensors")


def test_fingerprint_is_the_one_the_engine_checks(tmp_path):
    d = build_tiny_llava(tmp_path / "m")
    fps = model_fingerprints(d)
    assert fps["model_fingerprint"] == CheckpointReader(d).fingerprint()
    assert len(fps["model_weights_fingerprint"]) == 16
    d2 = build_tiny_llava(tmp_path / "m2", seed=1)
    assert model_fingerprints(d2)["model_fingerprint"] == fps["model_fingerprint"]  # same structure
    assert model_fingerprints(d2)["model_weights_fingerprint"] != fps["model_weights_fingerprint"]


def test_fisher_keys_are_the_checkpoint_tensor_names(tmp_path):
    d = build_tiny_llava(tmp_path / "m")
    model = tiny_llava_model()
    res = accumulate_fisher(model, [collate(llava_samples()[:2], "llava")])
    p = save_fisher(
        tmp_path / "f.safetensors", res.sums, res.num_samples, data_fingerprint="d", **model_fingerprints(d)
    )
    base = CheckpointReader(d)
    reader, _ = load_statistics(p)
    assert set(reader.names()) <= set(base.names())
    assert "language_model.lm_head.weight" in reader.names()
    for n in reader.names():
        assert reader.info(n).shape == base.info(n).shape


def test_shard_and_single_process_helpers():
    assert shard_samples(list(range(7)), 1, 3) == [1, 4]
    assert sorted(x for r in range(3) for x in shard_samples(list(range(7)), r, 3)) == list(range(7))
    assert dist_info() == (0, 1) or "RANK" in os.environ
    s = {"x": torch.ones(2)}
    assert all_reduce_sums(s, 3) == 3 and torch.equal(s["x"], torch.ones(2))
    finish_distributed()  # no group of ours: nothing to end, no error


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import tiny_llava_model
from test_stats_fisher import collate, llava_samples
from forgetless.stats.distributed import (all_reduce_sums, finish_distributed, gather_objects, init_distributed,
                                          shard_samples)
from forgetless.stats.fisher import accumulate_fisher
from forgetless.stats.gram import accumulate_gram
from forgetless.stats.store import save_fisher, save_gram

rank, world = init_distributed()
assert world == 2
model = tiny_llava_model()
mine = shard_samples(llava_samples(), rank, world)
batches = [collate(mine[i:i + 2], "llava") for i in range(0, len(mine), 2)]
f = accumulate_fisher(model, batches, variant=sys.argv[2])
g = accumulate_gram(model, batches)
n = all_reduce_sums(f.sums, f.num_samples)
counts = all_reduce_sums(g.grams, g.token_counts)
ng = all_reduce_sums({{}}, g.num_samples)
skipped = gather_objects(f.skipped)
if rank == 0:
    save_fisher(sys.argv[1] + "/fisher.safetensors", f.sums, n, model_fingerprint="m", data_fingerprint="d",
                extra={{"skipped": sum(skipped, [])}})
    save_gram(sys.argv[1] + "/gram.safetensors", g.grams, counts, ng, model_fingerprint="m", data_fingerprint="d",
              shared=g.shared)
finish_distributed()  # without it a rank may exit while gloo's threads live, and abort
"""


def test_two_processes_give_the_single_process_statistics(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(tmp_path),
        "sampled",
    ]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    model = tiny_llava_model()
    samples = llava_samples()
    batches = [collate(samples[:3], "llava"), collate(samples[3:], "llava")]  # another batching, one process
    f = accumulate_fisher(model, batches, variant="sampled")
    g = accumulate_gram(model, batches)
    fr, fmeta = load_statistics(tmp_path / "fisher.safetensors")
    gr, gmeta = load_statistics(tmp_path / "gram.safetensors")
    assert fmeta["num_samples"] == f.num_samples == 4 and gmeta["num_samples"] == 4
    assert gmeta["token_counts"] == g.token_counts
    assert set(fr.names()) == set(f.sums) and set(gr.names()) == set(g.grams)
    for k, v in f.sums.items():
        want = v / f.num_samples
        assert (fr.get(k) - want).abs().max() <= 1e-6 * want.abs().max() + 1e-30, k
    for k, v in g.grams.items():
        want = v.float()
        assert (gr.get(k) - want).abs().max() <= 1e-6 * want.abs().max(), k
