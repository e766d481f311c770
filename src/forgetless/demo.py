"""`forgetless demo` (`make demo`): the whole story on the testbed, on CPU, from files already on disk.

1. the testbed model — the embedded SmolLM2-135M-Instruct with the committed vision tower and projector — is
   assembled once as a Hugging Face LLaVA folder, and the tasks are generated from a seed;
2. it is fine-tuned on one downstream task (:data:`forgetless.testbed.experiment.FINETUNE`: the last 12 decoder
   layers and the projector), and becomes good at it while losing some of what it knew;
3. the Fisher statistics are computed (general at θ₀ on general data; task on the task's data, at θ₀ for CGM and
   CGM† as their published scripts do, at θ_ft for Fisher merging);
4. the base and fine-tuned models are merged with WiSE-FT, task arithmetic, TIES, DARE, Fisher merging, CGM and
   CGM†, and every model is evaluated: the task, the general visual tasks and the text knowledge probes;
5. the table (T, G_v, G_t, E, F, E+F) is printed and the trade-off plot written.

Every step is cached in the work folder (see :mod:`forgetless.testbed.experiment`): a second run only merges
again. The demo evaluates on the first 80 test samples of the task, 30 of each general visual task and 120 text
probes (to stay within 15 minutes on 2 cores); ``forgetless testbed report`` uses larger test sets (RESULTS.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .checkpoint.writer import atomic_write

DEFAULT_WORKDIR = Path("runs/demo")
DEMO_TASK = "count_many"
THREADS = 2


def run_demo(
    workdir: str | os.PathLike | None = None, *, task: str = DEMO_TASK, quick: bool = False, log=print
) -> dict:
    """Run the demo (module docstring); returns the experiment's results (also in workdir/<task>/results.json)."""
    from .testbed import experiment as X
    from .testbed.report import plot_rows, row_intervals, table

    t0 = time.perf_counter()
    workdir = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    prev = torch.get_num_threads()
    torch.set_num_threads(min(THREADS, os.cpu_count() or THREADS))
    try:
        merges = X.MERGES[:2] if quick else X.MERGES
        res = X.run_experiment(
            task, workdir / task, merges=merges, limits=X.DEMO_LIMITS, task_limit=X.DEMO_TASK_LIMIT, log=log
        )
    finally:
        torch.set_num_threads(prev)
    ivs = row_intervals(res["rows"])
    png = plot_rows(res["rows"], workdir / task / "tradeoff.png", f"forgetless demo: {task}", ivs)
    ft = res["finetune"]
    log("")
    log(
        f"task {task!r}: fine-tuned {', '.join(ft['train'])} for {ft['steps']} steps (lr {ft['lr']:g}). Scores in %: "
        "T task, G_v general visual, G_t text probes, G their mean; E = T − T(base), F = G − G(base) (negative: "
        "forgetting); ± half the 95% interval (bootstrap over the test items, E and F paired with the base)."
    )
    log(table(res["rows"], ivs))
    log("")
    log(f"plot: {png}")
    log(
        "timings: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in res["timings"].items())
        + f"; demo total {time.perf_counter() - t0:.0f}s"
    )
    res["plot"] = str(png)
    atomic_write(workdir / task / "results.json", json.dumps(res, indent=1) + "\n")
    return res
