"""What every step of a testbed driver (:mod:`.experiment`, :mod:`.multitask`, :mod:`.continual`) needs, in one
object: its folder, the base model, the generated tasks, the shared evaluation cache, the merge function, the log,
and the seconds each kind of step took (reported in ``results.json``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tasks as T

GENERAL = [*T.GENERAL_VISUAL, "probes"]  # the general tasks every model is scored on besides its own
EVAL_BATCH = 16  # the testbed drivers' evaluation batch
EVAL_PROGRESS_EVERY = 60.0  # seconds between progress lines of an evaluation (a full test run takes minutes)


def sparse(log: Callable[[str], None], every: float) -> Callable[[str], None]:
    """`log` passing the first line and then at most one line per `every` seconds: progress of a long step that
    a chain's log can keep."""
    last = -float("inf")

    def say(line: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every:
            last = now
            log(line)

    return say


@dataclass
class Context:
    """A testbed run: `roots` maps every generated task (downstream and :data:`GENERAL`) to its folder;
    evaluations are cached under `cache`; `timings` sums the seconds per kind of step since `started`."""

    workdir: Path
    base: Path
    roots: dict[str, Path]
    cache: Path
    merge: Callable[..., Any]
    log: Callable[[str], None]
    timings: dict[str, float]
    eval_batch: int = EVAL_BATCH
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(
        cls,
        workdir: str | Path,
        tasks: Iterable[str],
        *,
        timings: Iterable[str],
        base: Path | None = None,
        tasks_root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        merge: Callable[..., Any] | None = None,
        eval_batch: int = EVAL_BATCH,
        log: Callable[[str], None] = print,
    ) -> Context:
        """The base model (default: the testbed's) and `tasks` with the general ones generated under `tasks_root`
        (default ``workdir/../tasks``); evaluations cached under `cache_dir` (default ``workdir/../eval-cache``),
        shared by every testbed run. A ``setup`` entry of `timings` gets the seconds this took."""
        import forgetless

        from .build import testbed_model

        started = time.perf_counter()
        workdir = Path(workdir)
        base = Path(base) if base is not None else testbed_model()
        roots = T.write_tasks(
            Path(tasks_root) if tasks_root else workdir.parent / "tasks", [*tasks, *GENERAL]
        )
        seconds = dict.fromkeys(timings, 0.0)
        if "setup" in seconds:
            seconds["setup"] = time.perf_counter() - started
        return cls(
            workdir,
            base,
            roots,
            Path(cache_dir) if cache_dir else workdir.parent / "eval-cache",
            merge or forgetless.merge,
            log,
            seconds,
            eval_batch,
            started,
        )

    @property
    def general(self) -> dict[str, Path]:
        return {n: self.roots[n] for n in GENERAL}

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Add the seconds the block takes to ``timings[kind]`` (when the run reports that kind)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if kind in self.timings:
                self.timings[kind] += time.perf_counter() - t0

    def evaluate(
        self,
        model: Path,
        names: Iterable[str],
        *,
        split: str = "test",
        general: bool = True,
        limit: int | dict[str, int] | None = None,
    ) -> tuple[dict, bool]:
        """(result, cached): `model` on the tasks `names` (and the general tasks) through the evaluation cache."""
        from ..eval import cache

        with self.timed("evaluate"):
            return cache.cached_evaluate(
                model,
                {n: self.roots[n] for n in names},
                self.general if general else None,
                cache_dir=self.cache,
                split=split,
                limit=limit,
                batch_size=self.eval_batch,
                log=sparse(self.log, EVAL_PROGRESS_EVERY),
            )

    def finetuned(self, task_dir: Path, out: Path, recipe: dict) -> Path:
        """The base fine-tuned on `task_dir` by `recipe` into `out`, cached (:func:`.experiment.finetuned_model`)."""
        from .experiment import finetuned_model

        with self.timed("finetune"):
            return finetuned_model(self.base, task_dir, out, recipe, self.log)

    def merged(self, recipe: dict, out: Path) -> Any:
        """`recipe` merged into `out` (replaced), quietly; its report."""
        with self.timed("merge"):
            return self.merge(recipe, out=out, force=True, progress=False, log=None)

    def closing(self) -> dict[str, Any]:
        """The fields every ``results.json`` ends with: the seconds per kind of step and in all, and the threads."""
        import torch

        total = {**self.timings, "total": time.perf_counter() - self.started}
        return {"timings": {k: round(v, 1) for k, v in total.items()}, "threads": torch.get_num_threads()}

    def write(self, results: dict, name: str = "results.json") -> dict:
        """`results` as indented JSON at ``workdir/name``, whole or not at all; returns them."""
        from ..checkpoint.writer import atomic_write

        atomic_write(self.workdir / name, json.dumps(results, indent=1) + "\n")
        return results


def write_if_changed(path: Path, text: str) -> Path:
    """`text` at `path` (whole or not at all), unless the file already holds it: an unchanged input keeps its
    time stamp."""
    from ..checkpoint.writer import atomic_write

    if not path.is_file() or path.read_text() != text:
        atomic_write(path, text)
    return path


def read_results(path: Path) -> dict:
    """A ``results.json`` (or another results file) a testbed run wrote, refused naming the file when absent or
    damaged."""
    from ..safeload import read_json

    return read_json(
        path,
        remedy="run the experiment that writes it (forgetless testbed …), or restore the file",
        expect=dict,
    )
