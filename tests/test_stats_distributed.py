"""Statistics under torchrun, one command after another in the same processes (as the cgm chain computes its
Fishers): each command's process group ends whole (no gloo thread left) and the next one joins a new group."""

from __future__ import annotations

import dist_worker as W
import torch
from safetensors import safe_open
from test_stats_cli import tiny  # noqa: F401  (fixture: a 3-layer Llama, 6 QA samples)

from forgetless.cli import main

torch.set_num_threads(1)


def fisher_args(model, data, out, layer: int) -> list[str]:
    return [
        "stats",
        "fisher",
        str(model),
        "--data",
        str(data),
        "--scope",
        f"language.layers[{layer}]",
        "-n",
        "6",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]


def test_two_statistics_in_one_process_under_torchrun_give_the_single_process_files(tiny, tmp_path):
    _root, model, data = tiny
    for layer in (1, 2):
        main(fisher_args(model, data, tmp_path / f"one{layer}.safetensors", layer))
    ends = W.torchrun(
        "cli",
        tmp_path / "probe",
        *fisher_args(model, data, tmp_path / "two1.safetensors", 1),
        "--then",
        *fisher_args(model, data, tmp_path / "two2.safetensors", 2),
        timeout=300,
    )
    assert ends == [0, 0]  # two process groups, each ended with its threads
    for layer in (1, 2):
        with (
            safe_open(str(tmp_path / f"one{layer}.safetensors"), "pt") as a,
            safe_open(str(tmp_path / f"two{layer}.safetensors"), "pt") as b,
        ):
            assert a.keys() == b.keys() and len(a.keys()) == 7 and b.metadata()["num_samples"] == "6"
            for k in a.keys():  # noqa: SIM118  (safe_open is not iterable)
                torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k), rtol=1e-5, atol=0)
