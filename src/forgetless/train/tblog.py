"""TensorBoard event files for ``forgetless finetune``, laid out as the Hugging Face Trainer lays them out.

Per optimizer step (the step is TensorBoard's ``step``): ``train/loss`` (the step's mean answer loss),
``train/learning_rate``, ``train/grad_norm`` (before clipping), ``train/samples_per_second`` (the step's samples
over its wall time, all processes together), ``train/epoch`` (samples seen / samples in the data set); with a
keep rule, ``keep/updated_fraction`` (the fraction of entries whose update was kept, c ≠ 0) and ``keep/mean_c``
(the mean coefficient over all entries) — the numbers ``finetune.json`` records (values as float32).

While training, the events go to ``OUT.tensorboard/RUN/`` beside the output (the output folder itself appears
only when the run has finished, whole); ``RUN`` is the Trainer's run name (``May04_22-14-54_host``). When the
output is written they are copied into it, ``OUT/runs/RUN/`` as the Trainer writes them, and the live folder is
removed; a run that fails leaves its events where they were, to look at. ``tensorboard --logdir`` on the folder
holding the outputs shows both. Only rank 0 writes (under torchrun the others log nothing). Needs the
``tensorboard`` package (``pip install 'forgetless[tensorboard]'``); without it the run says so in one line and
trains without the logs.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

FLUSH_SECS = 10  # the events reach the disk at least this often (SummaryWriter's default is 120 s)
TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "samples_per_second": "train/samples_per_second",
    "epoch": "train/epoch",
    "updated_fraction": "keep/updated_fraction",
    "mean_c": "keep/mean_c",
}


def run_name() -> str:
    """The Trainer's default run folder name: the local date and time, and the host."""
    return f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"


def live_folder(out: Path) -> Path:
    """Where a run's events are written while it trains: ``OUT.tensorboard`` beside the output."""
    return out.parent / f"{out.name}.tensorboard"


class TrainingLog:
    """One run's scalars, step by step, into ``live_folder(out)/RUN``; :meth:`copy_into` puts them under the
    output's ``runs/RUN`` and :meth:`finish` removes the live copy."""

    def __init__(self, out: Path, writer_class: type) -> None:
        self.name = run_name()
        self.live = live_folder(out) / self.name
        self.writer = writer_class(log_dir=str(self.live), flush_secs=FLUSH_SECS)

    @classmethod
    def open(cls, out: Path, say: Callable[[str], None]) -> TrainingLog | None:
        """A log for the run writing `out`, or None (said in one line) when the tensorboard package is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            say(
                "  TensorBoard logs: off — the tensorboard package is not installed (pip install tensorboard, or "
                "forgetless[tensorboard]; --no-tensorboard turns the logs off without this note)"
            )
            return None
        log = cls(out, SummaryWriter)
        say(f"  TensorBoard logs: {log.live} (moved to {out / 'runs' / log.name} with the output)")
        return log

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (keys of :data:`TAGS`) at optimizer step ``step``."""
        for key, v in values.items():
            self.writer.add_scalar(TAGS[key], v, step)

    def close(self) -> None:
        self.writer.close()  # flushes; closing again does nothing

    def copy_into(self, folder: Path) -> None:
        """The closed run's events into ``folder/runs/RUN`` (the output's temporary folder, before its rename)."""
        self.close()
        shutil.copytree(self.live, folder / "runs" / self.name)

    def finish(self) -> None:
        """After the output is in place: remove the live copy (and ``OUT.tensorboard`` when nothing else is in it)."""
        shutil.rmtree(self.live, ignore_errors=True)
        try:
            self.live.parent.rmdir()
        except OSError:
            pass  # other runs' events (failed runs') stay
