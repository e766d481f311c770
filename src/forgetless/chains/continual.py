"""Continual merging of LoRA adapters, one task at a time: MAny's LPM (:mod:`.methods.lpm`) over a state folder.

    add_task("runs/state", adapter="runs/task3", gram="runs/task3-gram.safetensors", out="merged/after-task3",
             base="models/llava")       # base: needed on the first task; later taken from the state (and checked)
    print(show_state("runs/state"))

After each task t a LoRA adapter is trained for that task alone, from the base; the step folds it into the merged
update of every adapted Linear, ΔW*ₜ = (Σᵢ≤ₜ ΔWᵢGᵢ)(Σᵢ≤ₜ Gᵢ + ρI)⁻¹, by the exact recursion of
:mod:`.methods.lpm`, from the state, the task's adapter and the task's Gram file alone — never the earlier
adapters or data — and writes the merged model (the base with ΔW*ₜ folded in) or a rank-r PEFT adapter (truncated
SVD of ΔW*ₜ, ``rank``).

The choices made where MAny's paper is silent (where the Gram is taken, its scale, γ, shared Grams, which modules,
CPM) and the state folder's format, with its crash safety: docs/continual-state.md.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..checkpoint.guard import check_output, exclusive, lock_path
from ..checkpoint.lora import ADAPTER_CONFIG, ADAPTER_SAFE, PEFT_PREFIX, LoraAdapter
from ..checkpoint.reader import SAFE_SINGLE, CheckpointReader
from ..checkpoint.space import check_free_space, same_disk
from ..checkpoint.writer import (
    Entry,
    StreamingWriter,
    atomic_folder,
    human_bytes,
    moved_aside,
    parse_size,
    recover,
)
from ..cpm import (
    DEFAULT_TAU,
    base_projector,
    compute_prototype,
    projector_key,
    remote_code_config,
    write_routing,
)
from ..errors import ForgetlessError, naming, require_all
from ..methods.adapter import truncated_svd
from ..methods.linalg import resolve_device
from ..methods.lpm import DEFAULT_GAMMA, SingularGramError, Solver, lpm_accumulate, lpm_update, option_problem
from ..safeload import read_json
from ..stats.store import Statistics

FORMAT = "forgetless-continual"
VERSION = 1
STATE_JSON = "state.json"
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHARE_TOL = 1e-6
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")
OTHER_PART = "(outside the decoder layers)"
GramFiles = str | Path | list[str | Path]  # one Gram file, or several over disjoint modules

TASK_KEYS = frozenset(
    {
        "name",
        "adapter",
        "adapter_fingerprint",
        "modules",
        "gram",
        "gram_fingerprint",
        "data_fingerprint",
        "num_samples",
    }
)
BASE_KEYS = frozenset({"path", "fingerprint", "weights_fingerprint"})
DAMAGED = (
    "restore the state folder from a backup, or rebuild it: add the tasks listed in its state.json to a new "
    "state"
)


@dataclass
class ContinualReport:
    state: Path
    out: Path | None
    task: str
    step: int
    seconds: float
    state_bytes: int
    output: str  # "model" | "adapter" | "none"

    def summary(self) -> str:
        wrote = {
            "model": f"merged model → {self.out}",
            "adapter": f"rank-r adapter → {self.out}",
            "none": "no output",
        }[self.output]
        return (
            f"task {self.step} ({self.task}) added to {self.state} ({human_bytes(self.state_bytes)}) in "
            f"{self.seconds:.1f} s; {wrote}"
        )


# ---------------------------------------------------------------------------------------------- reading a state
def load_state(state: str | Path) -> dict[str, Any]:
    """state.json of a continual state folder, checked for format, version and the shape of every entry (a
    damaged file is named, never a crash later). A state a crashed replace left moved aside is put back first,
    unless a live writer holds the state's lock."""
    return read_state(state, FORMAT, VERSION, _meta_problem, "forgetless continual add")


def read_state(
    state: str | Path,
    fmt: str,
    version: int,
    meta_problem: Callable[[dict[str, Any]], str | None],
    command: str,
) -> dict[str, Any]:
    """:func:`load_state` for a state format of its own (``fmt``, ``version``, ``meta_problem`` saying what is
    wrong with its entries, ``command`` the command that writes it)."""
    path = Path(state)
    if not path.exists() and moved_aside(path):
        _recover_unlocked(path)
    f = path / STATE_JSON
    if not path.is_dir() or not f.is_file():
        what = "not found" if not path.exists() else f"not a continual state folder (no {STATE_JSON})"
        raise ForgetlessError(
            what,
            file=path,
            remedy=f"give the STATE folder `{command}` created (a new, absent path starts a new state)",
        )
    meta = read_json(f, remedy=DAMAGED)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ForgetlessError(f"not a {fmt} state", file=f, remedy=f"give a state folder `{command}` wrote")
    if meta.get("version") != version:
        raise ForgetlessError(
            f"state format version {meta.get('version')!r}, this forgetless reads {version}",
            file=f,
            remedy=f"use the forgetless version that wrote it ({meta.get('forgetless_version')})",
        )
    problem = meta_problem(meta)
    if problem:
        raise ForgetlessError(f"damaged state: {problem}", file=f, remedy=DAMAGED)
    return meta


def _recover_unlocked(path: Path) -> None:
    """:func:`~forgetless.checkpoint.writer.recover` under the state's lock, without waiting for a live writer."""
    try:
        with exclusive(path, wait=False):
            recover(path)
    except (ForgetlessError, OSError):
        pass  # a writer holds it (it recovers first), or the parent folder is not writable: nothing to put back


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a state.json's entries (keys, types, ranges), or None."""
    need = {
        "base": dict,
        "options": dict,
        "adapter_config": dict,
        "tasks": list,
        "modules": dict,
        "parts": dict,
    }
    for key, kind in need.items():
        if not isinstance(meta.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not BASE_KEYS <= meta["base"].keys():
        return f"'base' needs {sorted(BASE_KEYS)}"
    bad = _options_problem(meta["options"])
    if bad:
        return f"options: {bad}"
    if not meta["tasks"] or not all(isinstance(t, dict) and TASK_KEYS <= t.keys() for t in meta["tasks"]):
        return f"'tasks' must be a non-empty list of tasks with {sorted(TASK_KEYS)}"
    for n, m in meta["modules"].items():
        if not (
            isinstance(m, dict)
            and _is_shape(m.get("shape"), 2)
            and m.get("part") in meta["parts"]
            and m.get("group") in meta["modules"]
            and isinstance(m.get("module"), str)
        ):
            return f"module {n!r}: needs module, a 2-d shape, a part in 'parts' and a group in 'modules'"
    for fname, part in meta["parts"].items():
        if not (
            isinstance(part, dict)
            and isinstance(part.get("modules"), list)
            and all(meta["modules"].get(n, {}).get("part") == fname for n in part["modules"])
        ):
            return f"part {fname!r}: its modules do not name it"
    return None


def _is_shape(shape: Any, ndim: int) -> bool:
    return isinstance(shape, list) and len(shape) == ndim and all(type(s) is int and s > 0 for s in shape)


@dataclass(frozen=True)
class ContinualOptions:
    """The options a state is created with, which every later step keeps (the recursion is exact for one setting):
    LPM's γ, its mode and the Gram approximation, the stored dtype, and CPM's routing (``{"tau", "hard"}``) or None."""

    gamma: float = DEFAULT_GAMMA
    gamma_mode: str = "relative"
    approx: str = "full"
    dtype: str = "float32"
    cpm: dict[str, Any] | None = None

    @classmethod
    def of_state(cls, opts: dict[str, Any]) -> ContinualOptions:
        return cls(**{f.name: opts.get(f.name) for f in fields(cls)})

    def problem(self) -> str | None:
        """What is out of range, or None (checked on the first task and on every read of a state)."""
        lpm_problem = option_problem(self.gamma, self.gamma_mode, self.approx)
        if lpm_problem is not None:
            return lpm_problem
        if self.dtype not in STATE_DTYPES:
            return f"dtype={self.dtype!r} (float32 | float64)"
        if self.cpm is None:
            return None
        tau = self.cpm.get("tau") if isinstance(self.cpm, dict) else None
        if type(tau) not in (int, float) or not (math.isfinite(tau) and tau > 0):
            return f"cpm tau={tau!r} (a finite number > 0)"
        if not isinstance(self.cpm.get("hard"), bool):
            return f"cpm hard={self.cpm.get('hard')!r} (true | false)"
        return None


def _options_problem(opts: dict[str, Any]) -> str | None:
    return ContinualOptions.of_state(opts).problem()


def settle_options(
    meta: dict[str, Any] | None,
    state: Path,
    *,
    gamma: float | None,
    gamma_mode: str | None,
    approx: str | None,
    state_dtype: str | None,
    cpm_data: Any,
    tau: float | None,
    hard: bool | None,
) -> ContinualOptions:
    """A new state's options (the defaults where not given), checked; or the state's own, with every option this
    step names checked against them."""
    if meta is None:
        cpm = (
            None
            if cpm_data is None
            else {"tau": DEFAULT_TAU if tau is None else float(tau), "hard": bool(hard)}
        )
        opts = ContinualOptions(
            DEFAULT_GAMMA if gamma is None else float(gamma),
            gamma_mode or "relative",
            approx or "full",
            state_dtype or "float32",
            cpm,
        )
        bad = opts.problem()
        if bad:
            raise ForgetlessError(
                f"invalid option {bad}",
                file=state,
                remedy="give --gamma a finite number >= 0 and --tau a finite number > 0",
            )
        return opts
    opts = ContinualOptions.of_state(meta["options"])
    given = {"gamma": gamma, "gamma_mode": gamma_mode, "approx": approx, "dtype": state_dtype}
    for k, v in given.items():
        if v is not None and v != getattr(opts, k):
            raise ForgetlessError(
                f"the state was created with {k}={getattr(opts, k)!r}, this step asks {k}={v!r} "
                "(the recursion is exact only with one setting)",
                file=state,
                remedy=f"omit the option (or give {getattr(opts, k)!r}), or start a new state",
            )
    _check_same_cpm(opts.cpm, state, cpm_data, tau, hard)
    return opts


def _check_same_cpm(
    cpm: dict[str, Any] | None, state: Path, cpm_data: Any, tau: float | None, hard: bool | None
) -> None:
    if (cpm is None) != (cpm_data is None):
        raise ForgetlessError(
            "the state was created " + ("without" if cpm is None else "with") + " CPM "
            "(per-task projectors and routing); every task must do the same",
            file=state,
            remedy="drop --cpm-data" if cpm is None else "give --cpm-data TASK_DATA",
        )
    if cpm is not None and (
        (tau is not None and float(tau) != cpm["tau"]) or (hard is not None and bool(hard) != cpm["hard"])
    ):
        raise ForgetlessError(
            f"the state routes with tau={cpm['tau']}, hard={cpm['hard']}",
            file=state,
            remedy="omit --tau / --hard, or start a new state",
        )


def check_state(state: str | Path) -> dict[str, Any]:
    """:func:`load_state`, and every part file present with the tensors state.json promises (else one line)."""
    meta = load_state(state)
    refuse_damaged(state, part_problems(state, meta))
    return meta


def refuse_damaged(state: str | Path, problems: list[str]) -> None:
    """One line naming the damaged part files of a state (the first three), if any."""
    if problems:
        raise ForgetlessError(
            f"damaged state: {len(problems)} part file(s): " + "; ".join(problems[:3]),
            file=state,
            remedy=DAMAGED,
        )


def part_problems(state: str | Path, meta: dict[str, Any]) -> list[str]:
    """Every part file of the state that is missing, unreadable, or lacks a tensor of the expected shape
    (headers only: cheap at any size)."""
    path = Path(state)
    problems = []
    for fname, part in meta["parts"].items():
        bad = _part_problem(path / fname, _expected(meta, part["modules"]))
        if bad:
            problems.append(f"{fname}: {bad}")
    if meta["options"].get("cpm") is not None:
        for k in range(1, len(meta["tasks"]) + 1):
            if not (path / _cpm_file(k)).is_file():
                problems.append(f"{_cpm_file(k)}: missing")
    return problems


def _expected(meta: dict[str, Any], members: list[str]) -> dict[str, list[int]]:
    """The tensors one part holds and their shapes."""
    mods, diagonal = meta["modules"], meta["options"]["approx"] == "diagonal"
    want = {}
    for n in members:
        width = mods[n]["shape"][1]
        want[f"delta/{n}"] = mods[n]["shape"]
        group = mods[n]["group"]
        want[f"gram/{group}"] = [width] if diagonal else [width, width]
        want[f"ridge/{group}"] = []
    return want


def _part_problem(file: Path, want: dict[str, list[int]]) -> str | None:
    if not file.is_file():
        return "missing"
    try:
        with safe_open(str(file), framework="pt") as f:
            have = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:  # a truncated or garbage file
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for key, shape in want.items():
        if key not in have:
            return f"lacks {key}"
        if have[key] != shape:
            return f"{key} has shape {have[key]}, expected {shape}"
    return None


def state_bytes(state: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(state).iterdir() if p.is_file())


def _sums_bytes(meta: dict[str, Any]) -> tuple[int, int]:
    """Bytes of the merged deltas and of the Gram sums that a state of `meta` stores."""
    opts, mods = meta["options"], meta["modules"]
    size = STATE_DTYPES[opts["dtype"]].itemsize
    widths = [mods[g]["shape"][1] for g in {m["group"] for m in mods.values()}]
    grams = sum(w if opts["approx"] == "diagonal" else w * w for w in widths)
    return sum(math.prod(m["shape"]) for m in mods.values()) * size, grams * size


def show_state(state: str | Path) -> str:
    """The tasks, options, modules and sizes of a state, as ``forgetless continual show`` prints them."""
    meta = check_state(state)
    path = Path(state)
    opts = meta["options"]
    mods = meta["modules"]
    groups = {m["group"] for m in mods.values()}
    delta_bytes, gram_bytes = _sums_bytes(meta)
    cpm = opts.get("cpm")
    lines = [
        (
            f"{path}: continual LPM{' + CPM' if cpm else ''} state, {len(meta['tasks'])} task(s), base {meta['base']['path']} "
            f"({meta['base']['fingerprint']})"
        ),
        (
            f"  options: gamma={opts['gamma']} ({opts['gamma_mode']}), approx={opts['approx']}, "
            f"stored as {opts['dtype']}"
            + (f"; CPM routing tau={cpm['tau']}, hard={cpm['hard']}" if cpm else "")
        ),
        (
            f"  {len(mods)} adapted Linear weights, {len(groups)} Gram sums (shared inputs), "
            f"{len(meta['parts'])} part files"
        ),
        (
            f"  size: {human_bytes(state_bytes(path))} on disk (merged deltas {human_bytes(delta_bytes)}, "
            f"Gram sums {human_bytes(gram_bytes)})"
        ),
        "  tasks:",
    ]
    for i, t in enumerate(meta["tasks"], 1):
        lines.append(
            f"    {i}. {t['name']}: adapter {t['adapter']} ({t['adapter_fingerprint']}), {t['modules']} "
            f"modules; Gram {t['gram']} ({t['gram_fingerprint']}, data {t['data_fingerprint']}, "
            f"{t['num_samples']} samples)"
            + (
                f"; CPM prototype over {t['cpm_images']} images ({t['cpm_data_fingerprint']})"
                if "cpm_images" in t
                else ""
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def _open_base(base: str | Path, meta: dict[str, Any] | None, state: Path) -> CheckpointReader:
    path = Path(base)
    if "+" in str(base) and not path.exists():
        raise ForgetlessError(
            "the base is the model folder alone, without +ADAPTER",
            file=base,
            remedy="give the base model the adapters were trained from",
        )
    reader = CheckpointReader(path)
    if meta is not None:
        want = meta["base"]
        fp = reader.fingerprint()
        wfp = reader.weights_fingerprint()
        if fp != want["fingerprint"] or wfp != want["weights_fingerprint"]:
            what = (
                "another architecture"
                if fp != want["fingerprint"]
                else "the same architecture, other weights"
            )
            reader.close()
            raise ForgetlessError(
                f"the state was built on another base model ({want['path']}, fingerprint "
                f"{want['weights_fingerprint']}); {path} is {what} ({wfp})",
                file=state,
                remedy="give the base the state was started from, or start a new state",
            )
    return reader


def _check_adapter(
    adapter_dir: str | Path,
    base: CheckpointReader,
    meta: dict[str, Any] | None,
    *,
    allow_projector: bool = False,
) -> LoraAdapter:
    from ..engine import adapter_problems as _adapter_problems
    from ..engine import open_adapter as _open_adapter

    adapter = _open_adapter(str(adapter_dir), base, "adapter", str(adapter_dir))
    prefix = f"models[0] {adapter.path}: "
    problems = [p.removeprefix(prefix) for p in _adapter_problems([adapter], base)]
    for name in sorted(adapter.replacements()):
        if allow_projector and projector_key(name) is not None:
            continue  # CPM keeps it as this task's projector
        problems.append(
            f"carries the full tensor {name} (modules_to_save / non_lora_trainables); LPM merges "
            "LoRA deltas of Linear layers only"
            + (
                ""
                if allow_projector or projector_key(name) is None
                else " (CPM keeps a projector per task: --cpm-data)"
            )
        )
    if problems:
        raise ForgetlessError(
            f"{len(problems)} problem(s): "
            + "; ".join(problems[:3])
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""),
            file=adapter.path,
            remedy=f"give a LoRA adapter trained from {base.path} on its Linear layers (without "
            "modules_to_save or the projector)",
        )
    if meta is not None:
        fp = adapter.fingerprint()
        for i, t in enumerate(meta["tasks"], 1):
            if t["adapter_fingerprint"] == fp:
                raise ForgetlessError(
                    f"this adapter is already task {i} ({t['name']}) of the state (same fingerprint {fp})",
                    file=adapter.path,
                    remedy="add each task's adapter once; a retrained adapter is a new task",
                )
        theirs = adapter.config.get("base_model_name_or_path")
        ours = meta["base"].get("base_model_name_or_path")
        if theirs and ours and str(theirs) != str(ours):
            raise ForgetlessError(
                f"adapter of base_model_name_or_path {theirs!r}, the state's adapters are of {ours!r}",
                file=adapter.path / ADAPTER_CONFIG,
                remedy="give an adapter trained from the state's base (if it is the same model "
                "under another name, correct base_model_name_or_path)",
            )
        extra = sorted(set(adapter.loras()) - set(meta["modules"]))
        if extra:
            raise ForgetlessError(
                f"adapts {len(extra)} Linear weight(s) the state does not (e.g. {extra[0]}); the "
                "earlier tasks' Grams of them are unknown",
                file=adapter.path,
                remedy="train the adapter on the state's modules (or a subset), or start a new state",
            )
    return adapter


def _check_gram(gram: GramFiles, base: CheckpointReader, names: list[str]) -> tuple[Statistics, dict]:
    """The task's Gram from one file or several that complete each other, checked against the base and the
    state's modules."""
    paths = [Path(g) for g in (gram if isinstance(gram, list) else [gram])]
    path = paths[0]
    reader = Statistics(paths)
    meta = reader.meta
    try:
        if meta.get("kind") != "gram":
            raise ForgetlessError(
                f"a {meta.get('kind')!r} statistics file, not a Gram file",
                file=path,
                remedy="compute it with `forgetless stats gram BASE --data TASK_DATA`",
            )
        if meta.get("model_fingerprint") != base.fingerprint():
            raise ForgetlessError(
                "Gram statistics of another model (structure fingerprint "
                f"{meta.get('model_fingerprint')}, the base is {base.fingerprint()})",
                file=path,
                remedy=f"compute it at the base: forgetless stats gram {base.path} --data TASK_DATA",
            )
        wfp = meta.get("model_weights_fingerprint")
        if wfp is not None and wfp != base.weights_fingerprint():
            raise ForgetlessError(
                f"Gram statistics taken at other weights ({wfp}) than the base's "
                f"({base.weights_fingerprint()}); LPM takes every task's Gram at the base θ₀",
                file=path,
                remedy=f"compute it at the base: forgetless stats gram {base.path} --data TASK_DATA",
            )
        counts = meta.get("token_counts") or {}
        require_all(
            names,
            reader,
            "Gram",
            "adapted Linear weight(s)",
            file=path,
            remedy="compute the Gram over every adapted layer (stats gram without "
            "--scope, or files whose scopes together cover them)",
        )
        for n in names:
            width = base.info(n).shape[1]
            if tuple(reader.info(n).shape) != (width, width):
                raise ForgetlessError(
                    f"Gram shape {list(reader.info(n).shape)}, the weight takes {width} inputs",
                    file=reader.file_of(n),
                    tensor=n,
                    remedy="recompute the Gram file on the base",
                )
            if int(counts.get(n, 0)) <= 0:
                raise ForgetlessError(
                    "no token count (or zero tokens) for this Gram",
                    file=reader.file_of(n),
                    tensor=n,
                    remedy="recompute it with `forgetless stats gram` on data that reaches it",
                )
    except BaseException:
        reader.close()
        raise
    return reader, meta


def _gram_files(gram: GramFiles | None) -> list[str | Path]:
    return [] if gram is None else list(gram) if isinstance(gram, list) else [gram]


def _stats_dir(state: Path) -> Path:
    return state.parent / f"{state.name}-statistics"


def _check_cpm(
    base: CheckpointReader, state_names: list[str], data: str | Path, rank: int | None, adapter: str | Path
) -> list[str]:
    from ..checkpoint import layout as layouts

    if rank is not None:
        raise ForgetlessError(
            "CPM writes a routed model, not a rank-r adapter",
            file=adapter,
            remedy="drop --rank (or start a state without CPM)",
        )
    if not Path(data).is_file():
        raise ForgetlessError(
            "CPM data file not found",
            file=data,
            remedy="give the task's data (JSON/JSONL with images) to --cpm-data",
        )
    names = base_projector(base.names(), base.path)
    lay = layouts.detect_layout(base.config, base.names())
    vision = [n for n in state_names if layouts.part_of(lay, n) == "vision"]
    if vision:
        raise ForgetlessError(
            f"the adapters adapt {len(vision)} vision-tower weight(s) (e.g. {vision[0]}): CPM's "
            "prototypes are taken with the base's vision tower, which must stay the base's",
            file=adapter,
            remedy="train the adapters on the language model (and projector) only, or drop CPM",
        )
    return names


def _gram_for(
    base: CheckpointReader,
    names: list[str],
    data: str | Path,
    images: str | Path | None,
    n: int | None,
    seed: int,
    batch_size: int,
    device: str,
    stats_dir: Path,
    log: Callable[[str], None] | None,
    dtype: str = "float32",
    pixels: tuple[int | None, int | None] = (None, None),
) -> Path:
    """The task's Gram file at the base over `names`, reused from `stats_dir` when it was computed on the same base
    weights, data selection and modules (:func:`~forgetless.chains.steps.statistics_step`), else computed there."""
    import hashlib

    from ..stats.data import data_fingerprint, load_samples
    from .steps import statistics_step

    if not Path(data).is_file():
        raise ForgetlessError("task data file not found", file=data, remedy="check --data")
    fp = data_fingerprint(data, load_samples(data, image_folder=images, n=n, seed=seed))
    scope_fp = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    scope = ["re:^(?:" + "|".join(re.escape(x) for x in names) + ")$"]
    return statistics_step(
        "gram",
        base.path,
        data,
        stats_dir / f"gram-{fp}-{scope_fp}.safetensors",
        scope=scope,
        images=images,
        n=n,
        seed=seed,
        role="  Gram",
        log=log,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        min_pixels=pixels[0],
        max_pixels=pixels[1],
        progress=False,
    )


def _cpm_file(k: int) -> str:
    return f"cpm-task-{k:05d}.safetensors"


def _cpm_task(
    base: CheckpointReader,
    lora: LoraAdapter,
    proj_names: list[str],
    data: str | Path,
    images: str | Path | None,
    n: int | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The task's projector (the base's with this task's adapter applied: its full projector tensors, its LoRA on
    the projector, or neither) and its visual prototype at the base."""
    from ..stats.run import load_model as load_plain

    tensors = {
        f"proj/{projector_key(n)}": lora.apply(n, base.get(n)).to(base.info(n).dtype).contiguous()
        for n in proj_names
    }
    model, _ = load_plain(base.path, "cpu", "float32")
    proto, fp, count = compute_prototype(model, base.path, data, images=images, n=n)
    del model
    if log:
        log(f"  CPM: projector of {len(proj_names)} tensors, prototype over {count} images of {data}")
    tensors["prototype"] = proto.contiguous()
    return {"tensors": tensors, "data_fingerprint": fp, "images": count}


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the state's per-task CPM files are never edited: O(1) per step), else a copy."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_routed(out_tmp: Path, state_tmp: Path, meta: dict[str, Any]) -> None:
    cpm = meta["options"]["cpm"]
    projectors, prototypes = [], []
    for k in range(1, len(meta["tasks"]) + 1):
        t = load_file(str(state_tmp / _cpm_file(k)))
        prototypes.append(t.pop("prototype"))
        projectors.append({key.removeprefix("proj/"): v for key, v in t.items()})
    write_routing(
        out_tmp,
        [t["name"] for t in meta["tasks"]],
        projectors,
        torch.stack(prototypes),
        tau=cpm["tau"],
        hard=cpm["hard"],
    )


# ---------------------------------------------------------------------------------------------- layout of a state
def part_key(name: str) -> str:
    """The decoder layer a weight belongs to (``…layers.N``), or one shared key for everything else."""
    m = _LAYER.match(name)
    return m.group(1) if m else OTHER_PART


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return tuple(a.shape) == tuple(b.shape) and float((a - b).abs().max()) <= SHARE_TOL * max(scale, 1e-30)


def _new_layout(base: CheckpointReader, adapter: LoraAdapter, gram: Statistics) -> tuple[dict, dict]:
    """Modules and parts for a new state: each adapted weight's part (decoder layer) and Gram group (the first
    module, in base order, of its part whose Gram in the first task's file is the same stored tensor, or, in a
    file without shared Grams, equal to its own)."""
    order = {n: i for i, n in enumerate(base.names())}
    loras = adapter.loras()
    names = sorted(loras, key=order.__getitem__)
    parts: dict[str, dict[str, Any]] = {}
    modules: dict[str, dict[str, Any]] = {}
    by_part: dict[str, list[str]] = {}
    for n in names:
        by_part.setdefault(part_key(n), []).append(n)
    for i, (key, members) in enumerate(by_part.items()):
        fname = f"part-{i:05d}.safetensors"
        parts[fname] = {"key": key, "modules": members}
        reps: list[tuple[str, torch.Tensor]] = []
        by_key: dict[tuple, str] = {}
        for n in members:
            group = by_key.setdefault(gram.key(n), n)
            if group == n and not gram.meta.get("shared"):
                g = gram.get(n)
                group = next((r for r, rg in reps if _close(rg, g)), None)
                if group is None:
                    reps.append((n, g))
                    group = n
            modules[n] = {
                "module": loras[n].module,
                "shape": list(base.info(n).shape),
                "part": fname,
                "group": group,
            }
        del reps
    return modules, parts


# ---------------------------------------------------------------------------------------------- the step
def _adapter_config(template: dict[str, Any], rank: int) -> dict[str, Any]:
    cfg = dict(template)
    cfg.update(
        r=rank,
        lora_alpha=rank,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        inference_mode=True,
        modules_to_save=None,
    )
    cfg.setdefault("peft_type", "LORA")
    return cfg


def _card(meta: dict[str, Any], rank: int | None) -> str:
    opts = meta["options"]
    what = f"a rank-{rank} LoRA adapter (truncated SVD of ΔW*)" if rank else "the base with ΔW* folded in"
    lines = [
        f"# Continual LPM merge of {len(meta['tasks'])} task(s)",
        "",
        f"Written by forgetless {__version__} (`forgetless continual add`): {what}.",
        "",
        f"- base: `{meta['base']['path']}` (weights fingerprint {meta['base']['weights_fingerprint']})",
        f"- gamma = {opts['gamma']} ({opts['gamma_mode']}), approx = {opts['approx']}",
        "",
        "Tasks:",
        "",
    ]
    lines += [
        f"{i}. {t['name']}: adapter `{t['adapter']}` ({t['adapter_fingerprint']}), Gram `{t['gram']}` "
        f"(data {t['data_fingerprint']})"
        for i, t in enumerate(meta["tasks"], 1)
    ]
    return "\n".join(lines) + "\n"


def _one_writer(
    step: Callable[..., ContinualReport], load: Callable[[Path], dict[str, Any]] | None = None
) -> Callable[..., ContinualReport]:
    """Run `step` holding the state's lock (a second writer waits), after putting back a state a crash left moved
    aside; an interruption (Ctrl-C, SIGTERM) says in one line that the state is whole and how many tasks it has
    (read by `load`: :func:`load_state` by default, another state format's reader for its steps)."""

    @functools.wraps(step)
    def locked(state: str | Path, **kw: Any) -> ContinualReport:
        state = Path(state)
        with exclusive(state, log=kw.get("log", print)):
            recover(state)
            try:
                return step(state, **kw)
            except (KeyboardInterrupt, SystemExit):
                sys.stderr.write(f"{state}: interrupted; {_whole(state, load or load_state)}\n")
                raise

    return locked


def _whole(state: Path, load: Callable[[Path], dict[str, Any]]) -> str:
    if not state.exists():
        return "no state was written"
    try:
        return f"the state is whole, with {len(load(state)['tasks'])} task(s)"
    except ForgetlessError:
        return "the state is as it was before this step"


@dataclass
class _Step:
    """One step's inputs, checked and opened: the state's options, the base, the task's adapter and Gram, and
    where the output goes."""

    state: Path
    meta: dict[str, Any] | None
    opts: ContinualOptions
    base: CheckpointReader
    lora: LoraAdapter
    names: list[str]  # the state's adapted weights
    proj_names: list[str] | None
    gram_reader: Statistics | None = None
    gram_meta: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    rank: int | None = None


@_one_writer
def add_task(
    state: str | Path,
    *,
    adapter: str | Path,
    gram: GramFiles | None = None,
    out: str | Path | None,
    base: str | Path | None = None,
    name: str | None = None,
    rank: int | None = None,
    gamma: float | None = None,
    gamma_mode: str | None = None,
    approx: str | None = None,
    state_dtype: str | None = None,
    cpm_data: str | Path | None = None,
    cpm_images: str | Path | None = None,
    cpm_n: int | None = None,
    tau: float | None = None,
    hard: bool | None = None,
    data: str | Path | None = None,
    images: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    gram_dtype: str = "float32",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    stats_dir: str | Path | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    log: Callable[[str], None] | None = print,
) -> ContinualReport:
    """Add one task to the continual state STATE (created on the first task) and write the merged output.

    ``out``: the merged full model (``rank=None``) or a rank-``rank`` PEFT adapter folder; None writes only the
    state. ``base``: required on the first task; afterwards optional (the state's own, checked by fingerprint).
    ``gamma`` / ``gamma_mode`` / ``approx`` / ``state_dtype`` are fixed by the first task (defaults 1e-4,
    "relative", "full", "float32"); a later step that names a different value is refused.
    ``cpm_data`` (the task's data with images; ``cpm_images`` their folder, ``cpm_n`` a seeded subset): CPM on top
    of LPM (:mod:`.cpm`) — the state keeps the task's projector (from its adapter, else the base's) and visual
    prototype, and ``out`` is a routed model (``tau``, default 0.1, and ``hard`` fixed by the first task). A state
    started with CPM needs it on every task, one started without refuses it.
    ``gram``: the task's Gram file (taken at the base), or a list of files over disjoint modules; or ``data``
    (``images``, ``n``, ``seed``): the task's data,
    whose Gram is computed at the base over the state's modules (``forgetless stats gram``) into ``stats_dir``
    (default: ``STATE-statistics`` beside STATE), or reused from there when it was computed on the same base
    weights, data selection and modules.
    Every input is checked before any work (see the module docstring)."""
    t0 = time.perf_counter()
    state = Path(state)
    solve_device = _solve_device(device, state)
    meta = check_state(state) if state.exists() else None
    if meta is None and base is None:
        raise ForgetlessError(
            "a new state needs the base model", file=state, remedy="pass --base BASE_DIR on the first task"
        )
    opts = settle_options(
        meta,
        state,
        gamma=gamma,
        gamma_mode=gamma_mode,
        approx=approx,
        state_dtype=state_dtype,
        cpm_data=cpm_data,
        tau=tau,
        hard=hard,
    )
    base_reader = _open_base(base if base is not None else meta["base"]["path"], meta, state)
    step: _Step | None = None
    try:
        step = _open_step(state, meta, opts, base_reader, adapter, cpm_data, rank)
        if (gram is None) == (data is None):
            raise ForgetlessError(
                "give the task's Gram file or its data (one of the two)",
                file=adapter,
                remedy="--gram FILE (forgetless stats gram BASE --data …) or --data TASK_DATA",
            )
        stats = Path(stats_dir) if stats_dir else _stats_dir(state)
        inputs = [adapter, *_gram_files(gram), data, images, cpm_data, cpm_images, stats]
        step.out = None if out is None else _check_out(out, step, inputs, force)
        if gram is None:
            pixels = (min_pixels, max_pixels)
            gram = _gram_for(
                base_reader,
                step.names,
                data,
                images,
                n,
                seed,
                batch_size,
                device,
                stats,
                log,
                gram_dtype,
                pixels,
            )
        step.gram_reader, step.gram_meta = _check_gram(gram, base_reader, step.names)
        _check_rank(step, adapter)
        new_meta, task = _next_meta(step, base, adapter, name)
        cpm_new = _cpm_entry(step, task, cpm_data, cpm_images, cpm_n, log)
        _commit(step, new_meta, cpm_new, gram, solve_device, shard_size, force, log)
    finally:
        if step is not None and step.gram_reader is not None:
            step.gram_reader.close()
        base_reader.close()
    report = ContinualReport(
        state,
        step.out,
        task["name"],
        len(new_meta["tasks"]),
        time.perf_counter() - t0,
        state_bytes(state),
        "none" if step.out is None else "model" if rank is None else "adapter",
    )
    if log:
        log(report.summary())
    return report


def _check_out(out: str | Path, step: _Step, inputs: list, force: bool) -> Path:
    """The output folder, refused where it is the state, its lock, the base or any input."""
    state = step.state
    return check_output(out, [state, lock_path(state), step.base.path, *inputs], force=force)


def _cpm_entry(
    step: _Step,
    task: dict[str, Any],
    data: Any,
    images: Any,
    n: int | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any] | None:
    """With CPM: the task's projector and prototype (recorded in its state.json entry); None without."""
    if step.proj_names is None:
        return None
    cpm_new = _cpm_task(step.base, step.lora, step.proj_names, data, images, n, log)
    task.update(
        cpm_data=str(Path(data).resolve()),
        cpm_data_fingerprint=cpm_new.pop("data_fingerprint"),
        cpm_images=cpm_new.pop("images"),
    )
    return cpm_new


def _open_step(
    state: Path,
    meta: dict[str, Any] | None,
    opts: ContinualOptions,
    base: CheckpointReader,
    adapter: str | Path,
    cpm_data: str | Path | None,
    rank: int | None,
) -> _Step:
    """The task's adapter checked against the base and the state (and, with CPM, the projector's data)."""
    use_cpm = opts.cpm is not None
    lora = _check_adapter(adapter, base, meta, allow_projector=use_cpm)
    names = sorted(meta["modules"]) if meta is not None else sorted(lora.loras())
    proj_names = _check_cpm(base, names, cpm_data, rank, adapter) if use_cpm else None
    return _Step(state, meta, opts, base, lora, names, proj_names, rank=rank)


def _check_rank(step: _Step, adapter: str | Path) -> None:
    """An adapter output's rank fits every adapted weight."""
    if step.rank is None:
        return
    meta, rank = step.meta, step.rank
    shapes = {n: meta["modules"][n]["shape"] if meta else list(step.base.info(n).shape) for n in step.names}
    bad = [n for n, s in shapes.items() if not 1 <= rank <= min(s)]
    if bad:
        raise ForgetlessError(
            f"rank {rank} does not fit {len(bad)} adapted weight(s), e.g. {bad[0]} {shapes[bad[0]]}",
            file=adapter,
            remedy="give --rank between 1 and the smaller side of every adapted weight",
        )


def _next_meta(
    step: _Step, base: str | Path | None, adapter: str | Path, name: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state.json this step writes (a new state's, or the old one's with this task added) and the task's entry."""
    meta, reader, lora = step.meta, step.base, step.lora
    if meta is None:
        modules, parts = _new_layout(reader, lora, step.gram_reader)
        new_meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "forgetless_version": __version__,
            "base": {
                "path": str(Path(base).resolve()),
                "fingerprint": reader.fingerprint(),
                "weights_fingerprint": reader.weights_fingerprint(),
                "base_model_name_or_path": lora.config.get("base_model_name_or_path"),
            },
            "options": asdict(step.opts),
            "adapter_config": lora.config,
            "tasks": [],
            "modules": modules,
            "parts": parts,
        }
    else:
        new_meta = dict(meta, forgetless_version=__version__, tasks=list(meta["tasks"]))
    gram_reader, gram_meta = step.gram_reader, step.gram_meta
    task = {
        "name": name or Path(adapter).resolve().name,
        "adapter": str(Path(adapter).resolve()),
        "adapter_fingerprint": lora.fingerprint(),
        "modules": len(lora.loras()),
        "gram": ", ".join(str(p.resolve()) for p in gram_reader.paths),
        "gram_fingerprint": gram_reader.weights_fingerprint(),
        "data_fingerprint": gram_meta.get("data_fingerprint"),
        "num_samples": gram_meta.get("num_samples"),
        "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    new_meta["tasks"].append(task)
    return new_meta, task


def _output_writer(
    step: _Step, modules: dict[str, Any], shard_size: str | int, force: bool
) -> StreamingWriter | None:
    """The output's writer (the merged model, or a rank-r PEFT adapter in one file); None without an output."""
    if step.out is None:
        return None
    entries = _output_entries(step.base, step.names, modules, step.rank)
    out_bytes = sum(e.nbytes for e in entries)
    one_file = step.rank is not None  # a PEFT adapter is one adapter_model.safetensors
    return StreamingWriter(
        step.out,
        entries,
        force=force,
        shard_size=out_bytes + 1 if one_file else parse_size(shard_size),
        single_name=ADAPTER_SAFE if one_file else SAFE_SINGLE,
        metadata={"forgetless_version": __version__, "method": "lpm"},
    )


def _commit(
    step: _Step,
    new_meta: dict[str, Any],
    cpm_new: dict[str, Any] | None,
    gram: GramFiles,
    solve_device: torch.device,
    shard_size: str | int,
    force: bool,
    log: Callable[[str], None] | None,
) -> None:
    """Fold the task into every part (streamed, one at a time) into a new state beside the old one, write the
    output as it goes, commit the output, then swap the new state into place."""
    state, meta, opts, base = step.state, step.meta, asdict(step.opts), step.base
    modules, parts = new_meta["modules"], new_meta["parts"]
    number = len(new_meta["tasks"])
    out_bytes = (
        sum(e.nbytes for e in _output_entries(base, step.names, modules, step.rank)) if step.out else 0
    )
    _check_space(state, new_meta, step.out, out_bytes)
    writer = _output_writer(step, modules, shard_size, force)
    if log:
        log(
            f"continual: task {number} ({new_meta['tasks'][-1]['name']}) into {state}: {len(step.lora.loras())} "
            f"adapted weights, {len(parts)} parts, approx={opts['approx']}, gamma={opts['gamma']} "
            f"({opts['gamma_mode']})"
        )
    counts = step.gram_meta.get("token_counts") or {}
    with new_state(state, new_meta, writer) as tmp:
        if cpm_new is not None:
            for k in range(1, number):
                _link_or_copy(state / _cpm_file(k), tmp / _cpm_file(k))
            _save(cpm_new["tensors"], tmp / _cpm_file(number))
        fold = _Fold(
            modules,
            step.lora.loras(),
            step.gram_reader,
            counts,
            opts,
            writer,
            base,
            step.rank,
            gram,
            solve_device,
        )
        for fname, part in parts.items():
            old_file = state / fname if meta is not None else None
            _step_part(old_file, tmp / fname, part["modules"], fold)
        if writer is not None:
            _finish_output(step, writer, new_meta, tmp, cpm_new is not None)


@contextmanager
def new_state(state: Path, meta: dict[str, Any], writer: StreamingWriter | None) -> Iterator[Path]:
    """A folder for the new state beside `state`, swapped into place whole when the block ends, its state.json
    (`meta`, as the block leaves it) written last; a failure removes it and aborts the output's `writer`."""
    with atomic_folder(state) as tmp:
        try:
            yield tmp
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        with naming(tmp / STATE_JSON):
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")


def _finish_output(
    step: _Step, writer: StreamingWriter, new_meta: dict[str, Any], state_tmp: Path, routed: bool
) -> None:
    """The merged model's untouched tensors (and CPM's routing files), or the adapter's config; then commit."""
    base = step.base
    if step.rank is not None:
        cfg = _adapter_config(new_meta["adapter_config"], step.rank)
        writer.commit(
            extra_files={
                ADAPTER_CONFIG: json.dumps(cfg, indent=2) + "\n",
                "README.md": _card(new_meta, step.rank),
            }
        )
        return
    adapted = set(new_meta["modules"])
    for wn in base.names():
        if wn not in adapted:
            writer.write(
                wn, base.raw(wn) if base.format == "safetensors" else base.get(wn).to(base.info(wn).dtype)
            )
    if routed:
        _write_routed(writer.tmp, state_tmp, new_meta)
    writer.commit(
        side_files_from=base.path,
        config_updates=remote_code_config(base.path) if routed else None,
        extra_files={"README.md": _card(new_meta, None)},
    )


def _output_entries(
    base: CheckpointReader, names: list[str], modules: dict[str, Any], rank: int | None
) -> list[Entry]:
    """The output's tensors: every tensor of the base (the merged model), or each module's rank-r factors."""
    if rank is None:
        return [Entry(n, tuple(base.info(n).shape), base.info(n).dtype) for n in base.names()]
    entries = []
    for n in names:
        (o, i), mod = modules[n]["shape"], modules[n]["module"]
        entries += [
            Entry(f"{PEFT_PREFIX}{mod}.lora_A.weight", (rank, i), torch.float32),
            Entry(f"{PEFT_PREFIX}{mod}.lora_B.weight", (o, rank), torch.float32),
        ]
    return entries


def _check_space(state: Path, meta: dict[str, Any], out: Path | None, out_bytes: int) -> None:
    """The new state, written beside the old one (and the output, where it goes to the same disk), fits its disk:
    checked before the step's work."""
    need, what = sum(_sums_bytes(meta)), "the new state"
    if out is not None and same_disk(state, out):
        need, what = need + out_bytes, "the new state and the output"
    check_free_space(state, need, what)


def _solve_device(device: str, state: Path) -> torch.device:
    """The device of the step's solves (``--device``), refused before any work when malformed or absent."""
    try:
        return resolve_device(device)
    except ValueError as e:
        raise ForgetlessError(
            f"--device: {e}", file=state, remedy="give --device cpu, cuda, cuda:N or auto"
        ) from None


@dataclass
class _Fold:
    """What folding a task into a part needs: the modules, the task's factors and Gram (with its token counts and
    path), the state's options, the output's writer, the base, the output rank and the solves' device."""

    modules: dict[str, Any]
    loras: Any
    gram: Statistics
    counts: dict[str, int]
    opts: dict[str, Any]
    writer: StreamingWriter | None
    base: CheckpointReader
    rank: int | None
    gram_path: Any
    device: str | torch.device = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.opts["dtype"]]


def _step_part(old_file: Path | None, new_file: Path, members: list[str], fold: _Fold) -> None:
    """One decoder layer's state: read it, fold the task in, write the new file and this layer's output tensors."""
    with ExitStack() as stack:
        old = stack.enter_context(safe_open(str(old_file), framework="pt")) if old_file is not None else None
        new = _fold_part(old, members, fold)
    _save(new, new_file)


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    with naming(file):
        save_file(tensors, str(file), metadata={"format": "pt", "forgetless_version": __version__})


def _per_token(gram: Statistics, name: str, counts: dict[str, int], path: str | Path) -> torch.Tensor:
    """One module's Gram over its token count, in float64; NaN or Inf named."""
    g = gram.get(name)
    if not torch.isfinite(g).all():
        raise ForgetlessError(
            "the Gram has NaN or Inf entries",
            file=gram.file_of(name),
            tensor=name,
            remedy="recompute it with `forgetless stats gram` (and check the data and the model for NaN)",
        )
    return g.double().div_(int(counts[name]))


def _fold_part(old: Any, members: list[str], fold: _Fold) -> dict[str, torch.Tensor]:
    """The new tensors of one part; the old part's tensors are read one at a time (``old``: an open safetensors
    file, None on the first task). The solves, and the products they need, run on `device`; what the state and
    the output keep comes back to the CPU."""

    def previous(key: str) -> torch.Tensor | None:
        return old.get_tensor(key) if old is not None and key in old.keys() else None  # noqa: SIM118

    modules, gram, counts, gram_path, opts, dtype = (
        fold.modules,
        fold.gram,
        fold.counts,
        fold.gram_path,
        fold.opts,
        fold.dtype,
    )
    new: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    for n in members:
        groups.setdefault(modules[n]["group"], []).append(n)
    # the widest Gram first: its solve is the step's peak, reached before the part's other new tensors exist
    for group, names in sorted(groups.items(), key=lambda kv: -modules[kv[0]]["shape"][1]):
        g = _per_token(gram, group, counts, gram_path)
        for other in names[1:]:
            if gram.key(other) == gram.key(group):
                continue  # stored once: the same tensor
            go = _per_token(gram, other, counts, gram_path)
            if not _close(g, go):
                raise ForgetlessError(
                    f"the Grams of {group} and {other} differ, but the state shares one Gram for "
                    "these modules (they read the same input)",
                    file=gram_path,
                    tensor=other,
                    remedy="compute the Gram file with `forgetless stats gram` on the base",
                )
            del go
        prev_ridge = previous(f"ridge/{group}")
        try:
            h, ridge, inc, gt = lpm_accumulate(
                previous(f"gram/{group}"),
                0.0 if prev_ridge is None else float(prev_ridge),
                g,
                gamma=opts["gamma"],
                gamma_mode=opts["gamma_mode"],
                approx=opts["approx"],
            )
            del g
            new[f"gram/{group}"] = h.to(dtype, copy=True).contiguous()  # a copy: h is factorised next
            new[f"ridge/{group}"] = torch.tensor(ridge, dtype=torch.float64)
            solver = Solver(
                h, ridge, overwrite=True, device=fold.device
            )  # on the CPU, h is factorised in place
            del h
            gt = gt.to(solver.device)  # once for the modules that share it
        except SingularGramError as e:
            raise ForgetlessError(
                f"{e}",
                file=gram_path,
                tensor=group,
                remedy="start the state with a larger gamma (relative: 1e-3), or "
                "compute the Gram on more data",
            ) from None
        for n in names:
            lora = fold.loras.get(n)
            factors = None
            if lora is not None:
                A, B, s = lora.factors()
                factors = (A.double() * s, B.double())  # ΔWₜGₜ as B(AG): never the [out, in] product
            merged = lpm_update(previous(f"delta/{n}"), factors, gt, inc, solver)
            del factors
            if not torch.isfinite(merged).all():
                raise ForgetlessError(
                    "the merged delta has NaN or Inf",
                    tensor=n,
                    file=gram_path,
                    remedy="check the adapter's factors and the Gram file for NaN/Inf",
                )
            new[f"delta/{n}"] = merged.to(dtype).contiguous()
            if fold.writer is not None:
                _emit(fold.writer, fold.base, n, modules[n]["module"], merged, fold.rank)
            del merged
    return new


def _emit(
    writer: StreamingWriter,
    base: CheckpointReader,
    name: str,
    module: str,
    merged: torch.Tensor,
    rank: int | None,
) -> None:
    if rank is None:
        w = base.get(name)
        writer.write(name, (w.double() + merged).to(base.info(name).dtype).contiguous())
    else:
        A, B = truncated_svd(merged, rank)
        writer.write(f"{PEFT_PREFIX}{module}.lora_A.weight", A.float().contiguous())
        writer.write(f"{PEFT_PREFIX}{module}.lora_B.weight", B.float().contiguous())


__all__ = ["ContinualReport", "add_task", "load_state", "part_key", "show_state", "state_bytes"]
