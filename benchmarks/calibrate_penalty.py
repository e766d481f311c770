"""The testbed's EWC and L2-SP strengths (``forgetless.testbed.experiment.EWC_STRENGTH``, the frontier's grids):
λ at which the penalty's gradient at the plain fine-tune's weights, λ‖F ⊙ (θ_ft − θ₀)‖ (EWC, F the general Fisher
at θ₀ over the fine-tuned tensors) or λ‖θ_ft − θ₀‖ (L2-SP), is 0.1×, 1× and 10× the fine-tune's last gradient
norms (the median of its last 20 steps). Run after the plain fine-tune of digits exists:

    forgetless testbed frontier --task digits --curve wise-ft
    .venv/bin/python benchmarks/calibrate_penalty.py     # prints and writes runs/testbed/digits/penalty-calibration.json
"""

import json
import statistics
from pathlib import Path

import torch

from forgetless.chains import steps
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.stats.store import Statistics
from forgetless.testbed import experiment as X
from forgetless.testbed.build import testbed_model

torch.set_num_threads(1)
work = Path("runs/testbed/digits")
base = testbed_model()
general = X.general_calibration(work.parent / "tasks", work / "calibration" / "general.jsonl")
fisher = steps.statistics_step(
    "fisher",
    base,
    general,
    work / "statistics" / "fisher_general-train-scope.safetensors",
    scope=list(X.FINETUNE["train"]),
    n=X.STATS_SAMPLES,
    seed=0,
    variant="empirical",
    role="fisher_general (EWC)",
    batch_size=8,
    all_params=True,
)
ft = work / "finetuned"
g_end = statistics.median(json.loads((ft / "finetune.json").read_text())["grad_norms"][-20:])
ewc = l2 = 0.0
with CheckpointReader(base) as b, CheckpointReader(ft) as f, Statistics(fisher, strict=False) as F:
    for n in F.names():
        d = f.get(n).float() - b.get(n).float()
        ewc += float((F.get(n).float() * d).pow(2).sum())
        l2 += float(d.pow(2).sum())
ewc, l2 = ewc**0.5, l2**0.5
out = {
    "grad_norm_end": g_end,
    "norm_F_delta": ewc,
    "norm_delta": l2,
    "ewc": [r * g_end / ewc for r in (0.1, 1, 10)],
    "l2sp": [r * g_end / l2 for r in (0.1, 1, 10)],
}
print(json.dumps(out, indent=1))
(work / "penalty-calibration.json").write_text(json.dumps(out, indent=1))
