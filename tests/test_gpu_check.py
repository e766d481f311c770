"""benchmarks/gpu_check.py, the script a lent GPU runs, kept working: end to end with the CPU as its device (every
step, a 7B-shaped model at 1/16 of its sizes), each step's result the CPU's (within its tolerance), the JSON
written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_step_against_itself_on_the_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--quick", "--samples", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [r["step"] for r in rows] == list(gpu_check.STEPS)
    assert all(r["ok"] for r in rows), rows
    # the same path twice in this process: the same result; the torchrun and fsdp steps run in a subprocess with
    # torchrun's thread count (OMP_NUM_THREADS=1), whose float32 sums may round otherwise
    assert all(r["rel_error"] <= 1e-12 for r in rows if r["step"] not in ("torchrun", "fsdp")), rows
    assert "all steps within tolerance" in capsys.readouterr().out
