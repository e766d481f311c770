"""`forgetless finetune`'s TensorBoard logs (issue 17, part 3): the event files read back with tensorboard's own
EventAccumulator hold the loop's own numbers (the losses, learning rates, gradient norms and keep-rule statistics
that FinetuneReport and finetune.json record, as float32), in the Trainer's layout under the output; the flag turns
them off; without the tensorboard package the run says so in one line and trains without them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import test_finetune
import torch

from forgetless.cli import main
from forgetless.train import LoraSpec, finetune

pytest.importorskip("tensorboard")  # in forgetless[all]; the test of its absence fakes that below
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

torch.set_num_threads(1)
llama_dir, text_data = (
    test_finetune.llama_dir,
    test_finetune.text_data,
)  # fixtures: a 2-layer Llama, 8 QA samples
QA = test_finetune.QA
STEPS = 4


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(xs) -> list[float]:
    return [float(torch.tensor(x, dtype=torch.float32)) for x in xs]


@pytest.mark.parametrize("keep", ["none", "spider", "magnitude_mask"])
def test_events_hold_the_loops_own_numbers(tmp_path, llama_dir, text_data, keep):
    lines: list[str] = []
    out = tmp_path / "ft"
    report = finetune(
        llama_dir,
        text_data,
        out,
        train=["language.layers[1]"],
        steps=STEPS,
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        warmup=1,
        keep=keep,
        log=lines.append,
    )
    runs = list((out / "runs").iterdir())
    assert runs == [report.tensorboard] and len(list(runs[0].glob("events.out.tfevents.*"))) == 1
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["tensorboard"] == f"runs/{runs[0].name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # the live copy beside the output is gone
    assert any(f"TensorBoard logs: {tmp_path / 'ft.tensorboard' / runs[0].name}" in line for line in lines)

    got = scalars(runs[0])
    steps = list(range(1, STEPS + 1))
    for tag, values in (
        ("train/loss", report.losses),
        ("train/learning_rate", report.lrs),
        ("train/grad_norm", report.grad_norms),
        ("train/epoch", [4 * s / len(QA) for s in steps]),
    ):
        assert got[tag] == list(zip(steps, f32(values))), tag
    assert report.lrs == meta["lrs"] and report.losses == meta["losses"]
    # samples/s: 4 samples per step over that step's wall time; the steps' times add up to the run's
    per_step_s = [4 / v for _, v in got["train/samples_per_second"]]
    assert [s for s, _ in got["train/samples_per_second"]] == steps and min(per_step_s) > 0
    assert sum(per_step_s) == pytest.approx(report.seconds, rel=0.05, abs=0.05)
    if keep == "none":
        assert not any(tag.startswith("keep/") for tag in got)
    else:
        for key in ("updated_fraction", "mean_c"):
            assert got[f"keep/{key}"] == list(zip(steps, f32(report.keep[key]))), key
        assert 0 < report.keep["updated_fraction"][-1] <= 1


def test_lora_run_writes_them_too_and_the_flag_turns_them_off(tmp_path, llama_dir, text_data):
    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "lora",
        lora=LoraSpec(r=2, targets=["q_proj"]),
        steps=2,
        batch_size=2,
        lr=1e-3,
        log=None,
    )
    assert scalars(report.tensorboard)["train/loss"] == list(zip([1, 2], f32(report.losses)))
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    main(
        [
            "finetune",
            str(llama_dir),
            "--data",
            str(text_data),
            "--out",
            str(tmp_path / "off"),
            "--train",
            "language.layers[1]",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--no-tensorboard",
        ]
    )
    assert not (tmp_path / "off" / "runs").exists() and "tensorboard" not in json.loads(
        (tmp_path / "off" / "finetune.json").read_text()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "off"]


def test_without_the_package_one_line_and_no_logs(tmp_path, llama_dir, text_data, monkeypatch):
    for mod in [
        m
        for m in sys.modules
        if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))
    ]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    lines: list[str] = []
    report = finetune(
        llama_dir,
        text_data,
        tmp_path / "ft",
        train=["language.layers[1]"],
        steps=1,
        batch_size=2,
        log=lines.append,
    )
    notes = [line for line in lines if "TensorBoard" in line]
    assert (
        len(notes) == 1
        and "tensorboard package is not installed" in notes[0]
        and "--no-tensorboard" in notes[0]
    )
    assert report.tensorboard is None and not (tmp_path / "ft" / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]


def test_a_failed_run_leaves_its_events_beside_the_output(tmp_path, llama_dir, text_data):
    def boom(info):
        if info.step == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        finetune(
            llama_dir,
            text_data,
            tmp_path / "ft",
            train=["language.layers[1]"],
            steps=3,
            batch_size=2,
            hook=boom,
            log=None,
        )
    assert not (tmp_path / "ft").exists()
    (run,) = (tmp_path / "ft.tensorboard").iterdir()
    assert [s for s, _ in scalars(run)["train/loss"]] == [1]  # step 1 was logged and flushed
