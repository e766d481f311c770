"""Reliability under failures that are not bad input (issue 14): operating-system errors, unexpected errors,
signals, crashed writers and concurrent writers — one line, no traceback, inputs untouched, outputs whole or
absent, no temporary folder left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_llama
from test_bad_input import digest, fail, recipe

import forgetless
from forgetless.checkpoint import writer as W
from forgetless.cli import main
from forgetless.errors import ForgetlessError


@pytest.fixture()
def ws(tmp_path):
    base = build_tiny_llama(tmp_path / "base", seed=0)
    ft = build_tiny_llama(tmp_path / "ft", seed=1)
    return tmp_path, base, ft


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*forgetless-*")]


# ------------------------------------------------------------------------------------- recipe values
BAD_VALUES = [
    ("ties", {"parameters": {"density": "high"}}, "parameters.density: 'high' is not a number in (0, 1]"),
    ("ties", {"parameters": {"density": 1.5}}, "parameters.density: 1.5 is outside (0, 1]"),
    ("dare_linear", {"models_density": 0.0}, "models[0].density: 0.0 is outside (0, 1]"),
    (
        "dare_linear",
        {"parameters": {"rescale": "maybe"}},
        "parameters.rescale: 'maybe' is not one of true, false, l1",
    ),
    ("dare_linear", {"parameters": {"rescale": 1}}, "parameters.rescale: 1 is not one of true, false, l1"),
    ("task_arithmetic", {"parameters": {"lambda": "x"}}, "parameters.lambda: 'x' is not a number"),
    (
        "task_arithmetic",
        {"parameters": {"lambda": float("nan")}},
        "parameters.lambda: nan is not a finite number",
    ),
    ("task_arithmetic", {"parameters": {"lambda": True}}, "parameters.lambda: True is not a number"),
    ("linear", {"parameters": {"lambda": None}}, "parameters.lambda: a value is required"),
    ("regmean", {"parameters": {"alpha": 2}}, "parameters.alpha: 2 is outside [0, 1]"),
    ("ties", {"parameters": {"sign": "most"}}, "parameters.sign: 'most' is not one of total, frequency"),
    ("ties", {"shard_size": "big"}, "shard_size: 'big' is not a size"),
    ("ties", {"shard_size": 0}, "shard_size: 0: a shard size must be positive"),
    ("ties", {"seed": -1}, "seed: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize(
    "method, change, words",
    BAD_VALUES,
    ids=[w.split(":")[0] + f"-{i}" for i, (_, _, w) in enumerate(BAD_VALUES)],
)
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_a_bad_recipe_value_is_named_before_any_work(ws, capsys, method, change, words, dry):
    root, base, ft = ws
    rec = recipe(base, ft, method=method)
    if "models_density" in change:
        rec["models"] = [{"model": str(ft), "density": change["models_density"]}]
    else:
        rec.update(change)
    err = fail(root, rec, *(["--dry-run"] if dry else []), capsys=capsys)
    assert words in err, err


def test_linear_weights_summing_to_zero_are_named(ws, capsys):
    root, base, ft = ws
    rec = recipe(base, ft, ft, method="linear")
    rec["models"] = [{"model": str(ft), "weight": 1.0}, {"model": str(ft), "weight": -1.0}]
    err = fail(root, rec, capsys=capsys)
    assert "the weights [1.0, -1.0] sum to 0" in err and "bug" not in err


def test_every_numeric_parameter_of_every_method_has_a_kind():
    """No method parameter escapes the check: each has an annotated kind (or Literal choices)."""
    from forgetless.methods import METHODS

    for name, spec in METHODS.items():
        for p in spec.params:
            assert p in spec.choices or spec.kinds.get(p, ("any",))[0] != "any", (name, p)


# ------------------------------------------------------------------------------------- statistics
def _fisher_file(root: Path, at: Path, name: str, change=None, weights_of: Path | None = None) -> Path:
    """A Fisher file over every projection weight of `at`'s structure, as `forgetless stats` records it (taken
    at `weights_of`, default `at`); `change(tensors)` spoils it."""
    from safetensors.torch import load_file, save_file

    from forgetless.checkpoint.reader import CheckpointReader

    sd = load_file(str(at / "model.safetensors"))
    t = {
        k: torch.rand(v.shape, generator=torch.Generator().manual_seed(len(k))) + 0.1
        for k, v in sd.items()
        if k.endswith("proj.weight")
    }
    if change:
        change(t)
    meta = {
        "kind": "fisher",
        "num_samples": "4",
        "model_fingerprint": CheckpointReader(at).fingerprint(),
        "model_weights_fingerprint": CheckpointReader(weights_of or at).weights_fingerprint(),
    }
    save_file(t, str(root / name), metadata=meta)
    return root / name


def _fisher_recipe(base: Path, ft: Path, fisher: Path, method: str = "fisher_with_base") -> dict:
    scope = {"include": ["re:.*proj\\.weight$"], "outside": "finetuned"}
    if method == "fisher_with_base":
        return {
            "method": method,
            "base": str(base),
            "scope": scope,
            "statistics": {"fisher_base": str(fisher)},
            "models": [{"model": str(ft), "statistics": {"fisher": str(fisher)}}],
        }
    return {
        "method": method,
        "base": str(base),
        "models": [str(ft)],
        "scope": scope,
        "statistics": {"fisher_task": str(fisher), "fisher_general": str(fisher)},
    }


def _first_proj(t: dict) -> str:
    return min(t)


@pytest.mark.parametrize("method", ["fisher_with_base", "cgm", "cgm_dagger"])
@pytest.mark.parametrize(
    "spoil, words",
    [
        (lambda t: t[_first_proj(t)].view(-1).__setitem__(3, float("nan")), "1 NaN/Inf entries"),
        (lambda t: t[_first_proj(t)].view(-1).__setitem__(0, float("inf")), "1 NaN/Inf entries"),
        (lambda t: t[_first_proj(t)].view(-1).__setitem__(5, -1.0), "1 negative entries"),
    ],
    ids=["nan", "inf", "negative"],
)
def test_a_spoiled_statistic_is_named_with_its_tensor(ws, capsys, method, spoil, words):
    root, base, ft = ws
    f = _fisher_file(root, base, "fisher.safetensors", spoil)
    from safetensors import safe_open

    first = min(safe_open(str(f), "pt").keys())
    err = fail(root, _fisher_recipe(base, ft, f, method), capsys=capsys)
    assert str(f) in err and f"tensor '{first}'" in err and words in err and "recompute" in err


def test_statistics_taken_at_other_weights_are_refused_unless_allowed(ws, capsys):
    root, base, ft = ws
    other = build_tiny_llama(root / "other", seed=7)  # the same architecture, other weights
    f = _fisher_file(root, base, "fisher.safetensors", weights_of=other)
    err = fail(root, _fisher_recipe(base, ft, f), capsys=capsys)
    assert str(f) in err and "computed at other weights" in err and "--allow-other-model" in err
    r = _write(root, _fisher_recipe(base, ft, f))
    main(["merge", str(r), "--out", str(root / "out"), "--quiet", "--allow-other-model"])
    assert (root / "out" / "model.safetensors").is_file()
    # taken at the fine-tuned model (Fisher merging's own) or at the base (CGM's): accepted as they are
    for at in (ft, base):
        g = _fisher_file(root, base, f"fisher-{at.name}.safetensors", weights_of=at)
        main(
            [
                "merge",
                str(_write(root, _fisher_recipe(base, ft, g))),
                "--out",
                str(root / f"out-{at.name}"),
                "--quiet",
            ]
        )


# ------------------------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("outside", ["finetuned", "base"])
def test_a_bf16_finetune_beside_an_fp32_base(ws, outside):
    """Tensors taken from a model stored in another dtype are converted, not copied as raw bytes."""
    from safetensors.torch import load_file, save_file

    root, base, ft = ws
    sd = load_file(str(ft / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
        str(ft / "model.safetensors"),
        metadata={"format": "pt"},
    )
    rec = recipe(base, ft, scope={"include": ["re:.*q_proj\\.weight$"], "outside": outside})
    main(["merge", str(_write(root, rec)), "--out", str(root / "out"), "--quiet", "--dry-run"])
    main(["merge", str(_write(root, rec)), "--out", str(root / "out"), "--quiet"])
    got, b = load_file(str(root / "out" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    bf = load_file(str(ft / "model.safetensors"))
    for k, v in got.items():
        assert v.dtype == b[k].dtype, k
        src = bf if (outside == "finetuned" or k.endswith("q_proj.weight")) else b
        if v.is_floating_point() and not k.endswith("q_proj.weight"):
            assert torch.equal(v, src[k].to(v.dtype)), k


# ------------------------------------------------------------------------------------- damaged models
def _truncate(m: Path) -> Path:
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return f


def _not_a_state_dict(m: Path) -> Path:
    (m / "model.safetensors").unlink()
    torch.save({"a": [1, 2]}, m / "pytorch_model.bin")
    return m / "pytorch_model.bin"


@pytest.mark.parametrize(
    "damage, words",
    [(_truncate, "truncated"), (_not_a_state_dict, "not a state dict")],
    ids=["truncated", "bin-not-a-state-dict"],
)
@pytest.mark.parametrize("command", ["finetune", "stats fisher", "stats gram", "inspect", "eval", "cgm"])
def test_a_damaged_model_is_one_line_for_every_command(tmp_path, capsys, damage, words, command):
    """cgm: the damaged model is the fine-tuned one, named before the base's statistics are computed."""
    m = build_tiny_llama(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    f = damage(m)
    inputs = ["d.jsonl", "m"]
    if command == "cgm":
        inputs.insert(0, build_tiny_llama(tmp_path / "b").name)
    args = {
        "finetune": ["finetune", str(m), "--data", str(data), "--out", str(tmp_path / "o")],
        "stats fisher": [
            "stats",
            "fisher",
            str(m),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "f.safetensors"),
        ],
        "stats gram": [
            "stats",
            "gram",
            str(m),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "g.safetensors"),
        ],
        "inspect": ["inspect", str(m)],
        "eval": ["eval", str(m), "--tasks", str(data), "--out", str(tmp_path / "r.json")],
        "cgm": [
            "cgm",
            str(tmp_path / "b"),
            str(m),
            "--general-data",
            str(data),
            "--task-data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "-n",
            "1",
        ],
    }[command]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert str(f) in err and words in err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == inputs
    )  # no output, no statistics, no temporary folder


# ------------------------------------------------------------------------------------- malicious files
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_malicious_pickle_runs_no_code(ws, capsys):
    root, base, ft = ws
    (ft / "model.safetensors").unlink()
    marker = root / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(str(marker))}, ft / "pytorch_model.bin")
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert "pytorch_model.bin" in err and not marker.exists()


def test_a_yaml_tag_runs_no_code(ws, capsys):
    root, base, ft = ws
    marker = root / "pwned"
    text = yaml.safe_dump(recipe(base, ft)) + f"seed: !!python/object/apply:os.mkdir ['{marker}']\n"
    err = fail(root, text, capsys=capsys)
    assert "recipe.yaml" in err and not marker.exists()


# ------------------------------------------------------------------------------------- operating-system errors
@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "free space"), (errno.EDQUOT, "quota"), (errno.EIO, "check the path and the disk")],
)
def test_a_failing_disk_is_one_line_and_keeps_the_old_output(ws, capsys, monkeypatch, code, words):
    root, base, ft = ws
    main(["merge", str(_write(root, recipe(base, ft))), "--out", str(root / "out"), "--quiet"])
    old = digest(root / "out")

    def full(fd, buf, off):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(W.os, "pwrite", full)
    err = fail(root, recipe(base, ft, parameters={"lambda": 0.5}), "--force", capsys=capsys)
    assert os.strerror(code) in err and words in err
    assert digest(root / "out") == old  # the previous output is kept whole


def test_an_unwritable_output_folder_is_one_line(ws, capsys, monkeypatch):
    root, base, ft = ws

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))

    monkeypatch.setattr(W.tempfile, "mkdtemp", denied)
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert str(root) in err and "Permission denied" in err and "folder you may write to" in err


def test_an_unexpected_error_asks_for_a_report_and_debug_shows_the_traceback(ws, capsys, monkeypatch):
    root, base, ft = ws
    from forgetless.engine import run

    def boom(*a, **k):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(run, "execute", boom)
    r = _write(root, recipe(base, ft))
    with pytest.raises(SystemExit) as e:
        main(["merge", str(r), "--out", str(root / "out"), "--quiet"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert (
        "\n" not in err and "unexpected RuntimeError: something nobody expected" in err and "--debug" in err
    )
    with pytest.raises(RuntimeError, match="nobody expected"):
        main(["--debug", "merge", str(r), "--out", str(root / "out"), "--quiet"])


def _write(root: Path, rec: dict) -> Path:
    p = root / "recipe.yaml"
    p.write_text(yaml.safe_dump(rec))
    return p


# ------------------------------------------------------------------------------------- signals and crashes
SLOW_MERGE = """
import sys, time
from forgetless.checkpoint import writer
real = writer.StreamingWriter.write
def slow(self, name, data, at=0):
    real(self, name, data, at)
    time.sleep(0.2)
writer.StreamingWriter.write = slow
from forgetless.cli import main
main(sys.argv[1:])
"""


def test_sigterm_removes_the_temporary_folder(ws):
    root, base, ft = ws
    r = _write(root, recipe(base, ft))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(r), "--out", str(root / "out"), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not leftovers(root) and time.time() < deadline:
        time.sleep(0.05)
    assert leftovers(root), "the merge never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not leftovers(root) and not (root / "out").exists()
    assert "Traceback" not in err


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(ws):
    root, base, ft = ws
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    stale = [root / f".out.forgetless-tmp-{dead_pid}-abc", root / f".out.forgetless-old-{dead_pid}-xyz"]
    live = root / f".out.forgetless-tmp-{os.getppid()}-def"
    other = root / f".other.forgetless-tmp-{dead_pid}-ghi"  # another output's: not ours to remove
    for p in [*stale, live, other]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    main(["merge", str(_write(root, recipe(base, ft))), "--out", str(root / "out"), "--quiet"])
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert (root / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- concurrent writers
def _entries():
    return [W.Entry("w", (4,), torch.float32)]


def test_two_writers_of_one_output_never_share_a_folder_and_the_second_cannot_replace_the_first(tmp_path):
    out = tmp_path / "out"
    a = W.StreamingWriter(out, _entries(), shard_size=1 << 20)
    b = W.StreamingWriter(out, _entries(), shard_size=1 << 20)
    assert a.tmp != b.tmp and a.tmp.is_dir() and b.tmp.is_dir()
    a.write("w", torch.ones(4))
    b.write("w", torch.zeros(4))
    a.commit()
    with pytest.raises(ForgetlessError, match="appeared while this run was writing"):
        b.commit()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.ones(4))
    assert not leftovers(tmp_path)
    # with force the second one replaces it, whole
    c = W.StreamingWriter(out, _entries(), shard_size=1 << 20, force=True)
    c.write("w", torch.full((4,), 2.0))
    c.commit()
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.full((4,), 2.0))
    assert not leftovers(tmp_path)


def test_two_threads_merging_into_one_output_one_wins_the_other_is_told(ws):
    root, base, ft = ws
    results: list[object] = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = forgetless.merge(
                recipe(base, ft, parameters={"lambda": 0.3 + 0.4 * i}),
                out=root / "out",
                progress=False,
                log=None,
            )
        except BaseException as e:  # noqa: BLE001 — what each thread got is the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, ForgetlessError) for e in errors), errors  # never FileNotFoundError
    assert len(errors) <= 1 and (root / "out" / "model.safetensors").is_file()
    assert not leftovers(root)


def test_a_statistics_file_that_appears_meanwhile_is_kept(tmp_path):
    from forgetless.stats.store import save_statistics

    out = tmp_path / "f.safetensors"
    kw = {"kind": "fisher", "num_samples": 1, "model_fingerprint": "m", "data_fingerprint": "d"}
    save_statistics(out, {"w": torch.ones(2)}, **kw, replace=False)
    with pytest.raises(ForgetlessError, match="appeared while"):
        save_statistics(out, {"w": torch.zeros(2)}, **kw, replace=False)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out))["w"], torch.ones(2)) and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["f.safetensors"]
    save_statistics(out, {"w": torch.zeros(2)}, **kw)  # replace (--force)
    assert torch.equal(load_file(str(out))["w"], torch.zeros(2))


def test_concurrent_cache_writes_of_one_entry_never_clash(tmp_path):
    """The evaluation cache's entries and every step record (Step.save, atomic_write): a temporary file unique to
    each call, then a rename; a reader never sees half a record."""
    import json

    from forgetless.chains.steps import Step

    path = tmp_path / "entry.json"
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for i in range(20):
                Step(path).save({"k": k, "i": i, "pad": "x" * 5000})
                assert Step(path).done() is not None
        except BaseException as e:  # noqa: BLE001 — collected: the test is that there are none
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(path.read_text())["i"] == 19
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_atomic_folder_without_replace_keeps_what_another_writer_committed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ForgetlessError, match="appeared while"), W.atomic_folder(out, replace=False) as tmp:
        (tmp / "mine").write_text("1")
        out.mkdir()
        (out / "theirs").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"] and not leftovers(tmp_path)
    with W.atomic_folder(out) as tmp:  # replace (the default: the state folders' and caches' rule)
        (tmp / "mine").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["mine"] and not leftovers(tmp_path)
