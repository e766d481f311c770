"""Continual merging with MagMax or OPCM, one fine-tuned model at a time, through a state folder.

    merge_step("runs/mm", method="opcm", model="runs/ft-task1", base="models/llava", out="merged/after-task1")
    merge_step("runs/mm", model="runs/ft-task2", out="merged/after-task2")  # the state's method, base, options
    print(show_merge_state("runs/mm"))

After task t the model θₜ (fine-tuned from θₜ₋₁: sequential fine-tuning) joins the state, which keeps only what the
method needs — MagMax τ_max, OPCM the running sum Sₜ and the task-vector norms ‖τ₁‖ … ‖τₜ‖ — and the step writes
the merged model. The rules: :mod:`..methods.continual_merge`; t steps give what the rule gives on the t models at
once, bit for bit. A step streams one decoder layer (or one tensor outside the layers) at a time. The state is kept
as `continual add` keeps its own (:mod:`.continual`: one writer at a time, the whole new state swapped in at once,
a crash leaving the old state or the new one); its format: docs/continual-state.md, "MagMax and OPCM states".
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import __version__
from ..checkpoint.guard import check_output, lock_path
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.space import check_free_space, same_disk
from ..checkpoint.writer import StreamingWriter, human_bytes, parse_size
from ..errors import ForgetlessError
from ..methods import continual_merge as rules
from ..safeload import read_json
from .continual import (
    BASE_KEYS,
    DAMAGED,
    STATE_JSON,
    ContinualReport,
    _one_writer,
    _open_base,
    _output_entries,
    _part_problem,
    _save,
    _solve_device,
    new_state,
    read_state,
    refuse_damaged,
    state_bytes,
)

FORMAT = "forgetless-continual-merge"
VERSION = 1
METHODS = ("magmax", "opcm")
KEY = {"magmax": "tau_max", "opcm": "sum"}  # what a part file holds per tensor: τ_max, or the running sum Sₜ
_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # a numbered block: model.layers.N, visual.blocks.N, …
_PART = re.compile(r"part-\d{5}\.safetensors")
TASK_KEYS = frozenset({"name", "model", "model_fingerprint"})


# ---------------------------------------------------------------------------------------------- reading a state
def is_merge_state(state: str | Path) -> bool:
    """Whether STATE's state.json is of this format (as opposed to `continual add`'s); a damaged one is left to
    `continual add`'s reader to name."""
    f = Path(state) / STATE_JSON
    try:
        meta = read_json(f, remedy=DAMAGED) if f.is_file() else None
    except ForgetlessError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_merge_state(state: str | Path) -> dict[str, Any]:
    """state.json of a MagMax / OPCM state, checked as :func:`.continual.load_state` checks its own."""
    return read_state(state, FORMAT, VERSION, _meta_problem, "forgetless continual merge")


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a state.json's entries, or None."""
    for key, kind in {"base": dict, "options": dict, "tasks": list, "tensors": dict, "parts": dict}.items():
        if not isinstance(meta.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    method = meta.get("method")
    if method not in METHODS:
        return f"method {method!r} (one of {', '.join(METHODS)})"
    if not BASE_KEYS <= meta["base"].keys():
        return f"'base' needs {sorted(BASE_KEYS)}"
    bad = _option_problem(method, meta["options"].get("alpha"), None)
    if bad:
        return f"options: {bad}"
    tasks = meta["tasks"]
    if not tasks or not all(isinstance(t, dict) and TASK_KEYS <= t.keys() for t in tasks):
        return f"'tasks' must be a non-empty list of tasks with {sorted(TASK_KEYS)}"
    if method == "opcm" and not (
        _number(meta.get("sum_norm")) and all(_number(t.get("norm")) for t in tasks)
    ):
        return "an OPCM state needs every task's 'norm' and the 'sum_norm', numbers >= 0"
    for n, t in meta["tensors"].items():
        if not (
            isinstance(t, dict)
            and _is_shape(t.get("shape"))
            and t.get("part") in meta["parts"]
            and isinstance(t.get("linear"), bool)
        ):
            return f"tensor {n!r}: needs a shape, a part in 'parts' and whether it is Linear"
    for fname, part in meta["parts"].items():
        if not _PART.fullmatch(fname):
            return f"part {fname!r}: not a part file name (part-NNNNN.safetensors)"
        names = part.get("tensors") if isinstance(part, dict) else None
        if not isinstance(names, list) or any(meta["tensors"].get(n, {}).get("part") != fname for n in names):
            return f"part {fname!r}: its tensors do not name it"
    return None


def _number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x >= 0


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)


def check_merge_state(state: str | Path) -> dict[str, Any]:
    """:func:`load_merge_state`, and every part file present with the tensors and shapes state.json promises."""
    meta = load_merge_state(state)
    key = KEY[meta["method"]]
    problems = []
    for fname, part in meta["parts"].items():
        want = {f"{key}/{n}": meta["tensors"][n]["shape"] for n in part["tensors"]}
        bad = _part_problem(Path(state) / fname, want)
        if bad:
            problems.append(f"{fname}: {bad}")
    refuse_damaged(state, problems)
    return meta


def show_merge_state(state: str | Path) -> str:
    """The method, options, tasks and size of a MagMax / OPCM state, as ``forgetless continual show`` prints them."""
    meta = check_merge_state(state)
    method, tensors = meta["method"], meta["tensors"]
    linear = sum(t["linear"] for t in tensors.values())
    kept = "τ_max" if method == "magmax" else "the running sum S"
    lines = [
        (
            f"{state}: continual {method} state, {len(meta['tasks'])} task(s), base {meta['base']['path']} "
            f"({meta['base']['fingerprint']})"
        ),
        (
            f"  keeps {kept} of {len(tensors)} tensors ({linear} Linear weights) in {len(meta['parts'])} part "
            f"files; size {human_bytes(state_bytes(state))} on disk"
        ),
    ]
    if method == "opcm":
        norms = [t["norm"] for t in meta["tasks"]]
        scale = rules.opcm_scale(norms, meta["sum_norm"])
        lines.append(
            f"  options: alpha={meta['options']['alpha']}; mean task-vector norm {math.fsum(norms) / len(norms):.6g}, "
            f"‖S‖ = {meta['sum_norm']:.6g}, output scale {scale:.6g}"
        )
    lines.append("  tasks:")
    for i, t in enumerate(meta["tasks"], 1):
        extra = f", ‖τ‖ = {t['norm']:.6g}" if method == "opcm" else ""
        if t.get("lambda") is not None:
            extra += f", output with λ = {t['lambda']}"
        lines.append(f"    {i}. {t['name']}: model {t['model']} ({t['model_fingerprint']}){extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def _option_problem(method: str, alpha: Any, lambda_: Any) -> str | None:
    """What is out of range in a method's options, or None."""
    if method == "opcm" and not (type(alpha) in (int, float) and 0 <= alpha <= 1):
        return f"alpha={alpha!r} (a number in [0, 1])"
    if lambda_ is not None and not (type(lambda_) in (int, float) and math.isfinite(lambda_) and lambda_ > 0):
        return f"lambda={lambda_!r} (a finite number > 0)"
    return None


def _settle(
    meta: dict[str, Any] | None, state: Path, method: str | None, lambda_: float | None, alpha: float | None
) -> tuple[str, dict[str, Any], float | None]:
    """The state's method and options (a new state's from this step, checked), and this step's λ (MagMax)."""
    if meta is None and method is None:
        raise ForgetlessError(
            "a new state needs its method", file=state, remedy="pass --method magmax or --method opcm"
        )
    if meta is not None and method is not None and method != meta["method"]:
        raise ForgetlessError(
            f"the state merges with {meta['method']}, this step asks {method}",
            file=state,
            remedy=f"omit --method (or give {meta['method']}), or start a new state",
        )
    method = meta["method"] if meta is not None else method
    if method not in METHODS:
        raise ForgetlessError(f"method {method!r}", file=state, remedy=f"give one of {', '.join(METHODS)}")
    if method == "opcm" and lambda_ is not None:
        raise ForgetlessError(
            "OPCM takes no λ: its output scale is the running average task-vector norm",
            file=state,
            remedy="drop --lambda (MagMax's)",
        )
    if method == "magmax" and alpha is not None:
        raise ForgetlessError(
            "--alpha is OPCM's threshold; MagMax has none", file=state, remedy="drop --alpha"
        )
    if method == "magmax":
        lambda_ = rules.MAGMAX_LAMBDA if lambda_ is None else lambda_
        options: dict[str, Any] = {}
    elif meta is None:
        options = {"alpha": rules.OPCM_ALPHA if alpha is None else alpha}
    else:
        options = meta["options"]
        if alpha is not None and alpha != options["alpha"]:
            raise ForgetlessError(
                f"the state was created with alpha={options['alpha']}, this step asks alpha={alpha} (each step "
                "projects with the state's own)",
                file=state,
                remedy="omit --alpha, or start a new state",
            )
    bad = _option_problem(method, options.get("alpha"), lambda_)
    if bad:
        raise ForgetlessError(
            f"invalid option {bad}", file=state, remedy="give --alpha in [0, 1], --lambda > 0"
        )
    return method, options, lambda_


def _open_model(model: str | Path, base: CheckpointReader, meta: dict[str, Any] | None) -> CheckpointReader:
    """The fine-tuned model, refused when of another architecture than the base, the base itself, or a model the
    state already holds."""
    if "+" in str(model) and not Path(model).exists():
        raise ForgetlessError(
            "a model folder, not MODEL+ADAPTER",
            file=model,
            remedy="fold the adapter first: forgetless merge with --fold writes the full model",
        )
    reader = CheckpointReader(model)
    try:
        if reader.fingerprint() != base.fingerprint():
            raise ForgetlessError(
                f"another architecture than the base {base.path} (its tensors' names or shapes differ)",
                file=reader.path,
                remedy="give a model fine-tuned from the state's base",
            )
        fp = reader.weights_fingerprint()
        if fp == base.weights_fingerprint():
            raise ForgetlessError(
                "the base's own weights (its task vector is 0)",
                file=reader.path,
                remedy="give the model fine-tuned on the new task",
            )
        for i, t in enumerate(meta["tasks"] if meta is not None else [], 1):
            if t["model_fingerprint"] == fp:
                raise ForgetlessError(
                    f"this model is already task {i} ({t['name']}) of the state (same fingerprint {fp})",
                    file=reader.path,
                    remedy="merge each task's model once",
                )
    except BaseException:
        reader.close()
        raise
    return reader


def _part_key(name: str) -> str:
    """A tensor's part file: its numbered block (a decoder layer), or the tensor alone outside them."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def _layout(base: CheckpointReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state's tensors (every floating-point tensor of the base: its shape, part and whether it is a Linear
    weight) and its part files, in the base's order."""
    tensors: dict[str, Any] = {}
    by_key: dict[str, list[str]] = {}
    for n in base.names():
        info = base.info(n)
        if rules.merged_tensor(info.dtype):
            by_key.setdefault(_part_key(n), []).append(n)
    parts = {}
    for i, (key, names) in enumerate(by_key.items()):
        fname = f"part-{i:05d}.safetensors"
        parts[fname] = {"key": key, "tensors": names}
        for n in names:
            shape = list(base.info(n).shape)
            tensors[n] = {"shape": shape, "part": fname, "linear": rules.is_linear(n, shape)}
    return tensors, parts


def _state_size(base: CheckpointReader, tensors: dict[str, Any]) -> int:
    """Bytes of the stored tensors (each in its work dtype)."""
    return sum(
        math.prod(t["shape"]) * rules.work_dtype(base.info(n).dtype).itemsize for n, t in tensors.items()
    )


# ---------------------------------------------------------------------------------------------- the step
@dataclass
class _Step:
    """One step, checked and opened: the state (its old meta, None for a new one), the new meta, the readers,
    the options, where the output goes and what the pass gathers (OPCM's squared norms)."""

    state: Path
    meta: dict[str, Any] | None
    new_meta: dict[str, Any]
    base: CheckpointReader
    model: CheckpointReader
    lambda_: float | None
    device: torch.device
    out: Path | None
    tau_squares: list[float] = field(default_factory=list)
    sum_squares: list[float] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.new_meta["method"]


def _next_meta(
    meta: dict[str, Any] | None,
    method: str,
    options: dict[str, Any],
    base: CheckpointReader,
    model: CheckpointReader,
    name: str | None,
) -> dict[str, Any]:
    """The state.json this step writes (OPCM's norms filled in by the pass)."""
    if meta is None:
        tensors, parts = _layout(base)
        new = {
            "format": FORMAT,
            "version": VERSION,
            "method": method,
            "options": options,
            "base": {
                "path": str(base.path.resolve()),
                "fingerprint": base.fingerprint(),
                "weights_fingerprint": base.weights_fingerprint(),
            },
            "tasks": [],
            "tensors": tensors,
            "parts": parts,
        }
    else:
        new = dict(meta, tasks=list(meta["tasks"]))
    new["forgetless_version"] = __version__
    new["tasks"].append(
        {
            "name": name or model.path.resolve().name,
            "model": str(model.path.resolve()),
            "model_fingerprint": model.weights_fingerprint(),
            "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return new


@functools.partial(_one_writer, load=load_merge_state)
def merge_step(
    state: str | Path,
    *,
    model: str | Path,
    method: str | None = None,
    base: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    lambda_: float | None = None,
    alpha: float | None = None,
    device: str = "auto",
    shard_size: str | int = "5GB",
    force: bool = False,
    log: Callable[[str], None] | None = print,
) -> ContinualReport:
    """Merge the model after one more task into the MagMax / OPCM state STATE (created by the first step) and write
    the merged model to ``out`` (None: the state only).

    ``method`` ("magmax" | "opcm") and ``base`` are needed on the first step; later the state's (checked).
    ``lambda_``: MagMax's scale of τ_max in this step's output (default 0.5; it is not kept: any step may change it).
    ``alpha``: OPCM's threshold on the cumulative share of singular values, fixed by the first step (default 0.5).
    ``device``: where OPCM's SVDs run. Every input is checked before any work."""
    t0 = time.perf_counter()
    state = Path(state)
    meta = check_merge_state(state) if state.exists() else None
    method, options, lambda_ = _settle(meta, state, method, lambda_, alpha)
    solve_device = _solve_device(device, state)
    if meta is None and base is None:
        raise ForgetlessError("a new state needs the base model", file=state, remedy="pass --base BASE_DIR")
    with ExitStack() as stack:
        base_reader = stack.enter_context(_open_base(base or meta["base"]["path"], meta, state))
        model_reader = stack.enter_context(_open_model(model, base_reader, meta))
        out_path = None
        if out is not None:
            inputs = [state, lock_path(state), base_reader.path, model_reader.path]
            out_path = check_output(out, inputs, force=force)
        new_meta = _next_meta(meta, method, options, base_reader, model_reader, name)
        step = _Step(state, meta, new_meta, base_reader, model_reader, lambda_, solve_device, out_path)
        if step.method == "magmax":
            new_meta["tasks"][-1]["lambda"] = lambda_ if out_path is not None else None
        _check_space(step)
        if log:
            log(
                f"continual {method}: task {len(new_meta['tasks'])} ({new_meta['tasks'][-1]['name']}) into "
                f"{state}: {len(new_meta['tensors'])} tensors in {len(new_meta['parts'])} parts"
            )
        _commit(step, shard_size, force)
    report = ContinualReport(
        state,
        out_path,
        new_meta["tasks"][-1]["name"],
        len(new_meta["tasks"]),
        time.perf_counter() - t0,
        state_bytes(state),
        "none" if out_path is None else "model",
    )
    if log:
        log(report.summary())
    return report


def _check_space(step: _Step) -> None:
    """The new state, written beside the old one (and the output, on the same disk), fits its disk."""
    need, what = _state_size(step.base, step.new_meta["tensors"]), "the new state"
    if step.out is not None and same_disk(step.state, step.out):
        need += sum(e.nbytes for e in _output_entries(step.base, [], {}, None))
        what = "the new state and the output"
    check_free_space(step.state, need, what)


def _commit(step: _Step, shard_size: str | int, force: bool) -> None:
    """Fold the model into every part (one at a time) into a new state beside the old one, write the output
    (MagMax: as it goes; OPCM: from the new state, once its norm is known), commit the output, then swap the new
    state into place."""
    meta, new_meta = step.meta, step.new_meta
    writer = None
    if step.out is not None:
        entries = _output_entries(step.base, [], {}, None)
        writer = StreamingWriter(
            step.out,
            entries,
            force=force,
            shard_size=parse_size(shard_size),
            metadata={"forgetless_version": __version__, "method": step.method},
        )
    with new_state(step.state, new_meta, writer) as tmp:
        for fname, part in new_meta["parts"].items():
            old = step.state / fname if meta is not None else None
            _save(_fold_part(step, old, part["tensors"], writer), tmp / fname)
        if step.method == "opcm":
            new_meta["tasks"][-1]["norm"] = rules.model_norm(step.tau_squares)
            new_meta["sum_norm"] = rules.model_norm(step.sum_squares)
            if writer is not None:
                _write_opcm(step, tmp, writer)
        if writer is not None:
            _finish_output(step, writer)


def _fold_part(
    step: _Step, old_file: Path | None, names: list[str], writer: StreamingWriter | None
) -> dict[str, torch.Tensor]:
    """One part's new tensors: each tensor's task vector folded into the old part's (read one at a time); MagMax
    writes the output's tensors here."""
    key, alpha = KEY[step.method], step.new_meta["options"].get("alpha")
    new: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        old = stack.enter_context(safe_open(str(old_file), framework="pt")) if old_file is not None else None
        for n in names:
            theta0 = step.base.get(n)
            tau = rules.task_vector(step.model.get(n), theta0)
            previous = old.get_tensor(f"{key}/{n}") if old is not None else None
            if step.method == "magmax":
                kept = rules.magmax_select(previous, tau)
                if writer is not None:
                    writer.write(n, rules.apply(theta0, kept, step.lambda_))
            else:
                linear = step.new_meta["tensors"][n]["linear"]
                kept = rules.opcm_add(previous, tau, linear, alpha, step.device)
                step.tau_squares.append(rules.square_norm(tau))
                step.sum_squares.append(rules.square_norm(kept))
            del theta0, tau, previous
            new[f"{key}/{n}"] = kept.contiguous()
    return new


def _write_opcm(step: _Step, state_tmp: Path, writer: StreamingWriter) -> None:
    """OPCM's output θ₀ + (n̄ₜ/‖Sₜ‖)·Sₜ, read back from the new state a part at a time."""
    meta = step.new_meta
    scale = rules.opcm_scale([t["norm"] for t in meta["tasks"]], meta["sum_norm"])
    for fname, part in meta["parts"].items():
        with safe_open(str(state_tmp / fname), framework="pt") as f:
            for n in part["tensors"]:
                writer.write(n, rules.apply(step.base.get(n), f.get_tensor(f"sum/{n}"), scale))


def _finish_output(step: _Step, writer: StreamingWriter) -> None:
    """The base's tensors the method leaves (integer buffers), the card, and the commit."""
    base = step.base
    for n in base.names():
        if n not in step.new_meta["tensors"]:
            writer.write(n, base.raw(n) if base.format == "safetensors" else base.get(n))
    writer.commit(side_files_from=base.path, extra_files={"README.md": _card(step)})


def _card(step: _Step) -> str:
    meta = step.new_meta
    how = (
        f"θ₀ + λ·τ_max, λ = {step.lambda_}"
        if step.method == "magmax"
        else f"θ₀ + (n̄/‖S‖)·S, alpha = {meta['options']['alpha']}"
    )
    lines = [
        f"# Continual {step.method} merge of {len(meta['tasks'])} task(s)",
        "",
        f"Written by forgetless {__version__} (`forgetless continual merge`): {how}.",
        "",
        f"- base: `{meta['base']['path']}` (weights fingerprint {meta['base']['weights_fingerprint']})",
        "",
        "Tasks:",
        "",
    ]
    lines += [
        f"{i}. {t['name']}: model `{t['model']}` ({t['model_fingerprint']})"
        for i, t in enumerate(meta["tasks"], 1)
    ]
    return "\n".join(lines) + "\n"


__all__ = ["check_merge_state", "is_merge_state", "load_merge_state", "merge_step", "show_merge_state"]
