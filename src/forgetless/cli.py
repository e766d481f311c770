"""The `forgetless` command. Every subcommand is a thin wrapper over the Python API."""

from __future__ import annotations

import errno
import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import ForgetlessError

POSITIVE = click.IntRange(min=1)  # counts and sizes: 0 or less is refused before any work


def folder_option(flag: str, **kw: Any) -> Callable:
    """An option naming a folder (none by default)."""
    return click.option(flag, type=click.Path(file_okay=False), default=None, **kw)


def file_option(flag: str, **kw: Any) -> Callable:
    """An option naming a file (none by default)."""
    return click.option(flag, type=click.Path(dir_okay=False), default=None, **kw)


def shown(flag: str, kind: Any, default: Any, **kw: Any) -> Callable:
    """An option of type ``kind`` with its default shown."""
    return click.option(flag, type=kind, default=default, show_default=True, **kw)


def choice(flag: str, options: list[str], default: str, **kw: Any) -> Callable:
    """An option taking one of ``options``, ``default`` shown: ``@choice("--tokens", ["all", "answer"], "all")``."""
    return click.option(flag, type=click.Choice(options), default=default, show_default=True, **kw)


def one_process(command: str) -> None:
    """Refuse a command that is not data-parallel when torchrun started several processes (each would redo it)."""
    from .stats.distributed import dist_info

    if dist_info()[1] > 1:
        raise ForgetlessError(
            f"`forgetless {command}` runs on one process, and torchrun started several",
            remedy="run it without torchrun (stats, cgm, eval, sweep and finetune are the "
            "commands that divide their work among torchrun's processes)",
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forgetless")
@click.option(
    "--debug", is_flag=True, help="Show the traceback of an unexpected failure (otherwise one line)."
)
def cli(debug: bool) -> None:
    """Adapt multimodal LLMs to a task without losing what they knew."""


@cli.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (overrides the recipe's `out`).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything, print the plan and a peak-memory estimate; write nothing.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--fold", is_flag=True, help="Adapter-space methods: write the full merged model, not an adapter."
)
@click.option(
    "--allow-other-model",
    is_flag=True,
    help="Accept statistics computed at weights that are neither the "
    "base's nor a merged model's (same architecture), and adapters folded into another model than their "
    "base_model_name_or_path (--fold, MODEL+ADAPTER); the recipe key allow_other_model.",
)
@click.option(
    "--memory",
    default=None,
    metavar="SIZE",
    help="Peak memory the merge may take (e.g. 8GiB; default: the recipe's memory, else auto = half of "
    "the available memory). Tensors too large for it are merged in blocks of rows, with the same result.",
)
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Where RegMean's solves and the adapter-space SVDs run: cpu, cuda, cuda:N or auto (CUDA "
    "when present); overrides the recipe's device (default cpu). Other methods: the CPU.",
)
def merge_cmd(
    recipe: str,
    out: str | None,
    dry_run: bool,
    force: bool,
    quiet: bool,
    fold: bool,
    allow_other_model: bool,
    memory: str | None,
    device: str | None,
) -> None:
    """Merge checkpoints as RECIPE.yaml describes."""
    from .engine import merge

    one_process("merge")
    from .recipe import load_recipe

    loaded = load_recipe(recipe)
    if device is not None:
        loaded = loaded.model_copy(update={"device": device})  # checked when the merge is planned
    if fold:
        loaded = loaded.model_copy(update={"fold": True})
    if allow_other_model:
        loaded = loaded.model_copy(update={"allow_other_model": True})
    merge(loaded, out=out, force=force, dry_run=dry_run, progress=not quiet, log=click.echo, memory=memory)


@cli.command("inspect")
@click.argument("model")
@click.option("--layout", default=None, help="Override the detected layout family.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: str, layout: str | None, as_json: bool) -> None:
    """Layout, parts (parameter counts, dtypes) and adapters of MODEL (a folder or DIR+ADAPTER)."""
    from .inspect import format_inspection, inspect_json, inspect_model

    info = inspect_model(model, layout)
    click.echo(inspect_json(info) if as_json else format_inspection(info))


@cli.command("benchmarks")
def benchmarks_cmd() -> None:
    """The standard benchmarks `forgetless eval --benchmark` reads, with their headline figure."""
    from .eval import benchmarks

    for name in benchmarks.names():
        b = benchmarks.get(name)
        click.echo(f"{name}: {b.description}\n    headline: {b.headline}")


@cli.command("methods")
def methods_cmd() -> None:
    """The merge methods and their parameters."""
    from .methods import METHODS
    from .methods.registry import REQUIRED, as_yaml

    seen = set()
    for key, spec in sorted(METHODS.items()):
        if spec.name in seen:
            continue
        seen.add(spec.name)
        params = ", ".join(
            f"{p}={'(required)' if d is REQUIRED else as_yaml(d)}"
            + (f" in {spec.ranges[p]}" if p in spec.ranges else "")
            + (f" ({'|'.join(map(as_yaml, spec.choices[p]))})" if p in spec.choices else "")
            + (" [per model]" if p in spec.per_model else "")
            for p, d in spec.params.items()
        )
        aliases = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        needs = f"\n    needs statistics: {', '.join(spec.needs)}" if spec.needs else ""
        space = (
            (
                "\n    adapter space: models are PEFT LoRA adapters of base; writes an adapter (fold: true: the "
                "full model)"
            )
            if spec.space == "adapter"
            else ""
        )
        click.echo(f"{spec.name}{aliases}: {spec.doc}\n    {params}{needs}{space}")
    click.echo(_continual_methods())


def _continual_methods() -> str:
    """What `forgetless methods` adds about the methods run one task at a time (not registry merges)."""
    from .methods.continual_merge import MAGMAX_LAMBDA, OPCM_ALPHA

    return (
        "\nOne task at a time (forgetless continual merge STATE --method M --model FINETUNED):\n"
        f"magmax: the registered magmax above, step by step.\n    lambda={MAGMAX_LAMBDA} in (0, inf)\n"
        "opcm: OPCM: each new task vector projected off the principal subspace of the merged update so far, "
        "added, and the sum rescaled to the tasks' mean norm.\n"
        f"    alpha={OPCM_ALPHA} in [0, 1] (the cumulative share of the singular values that sets the subspace)\n"
        "lpm: MAny's LPM on LoRA adapters (forgetless continual add; docs/continual.md)."
    )


def _pixels_options(fn):
    """--min-pixels / --max-pixels: a dynamic-resolution processor's image bounds (Qwen2-VL, Qwen2.5-VL)."""
    for name, what in (("--max-pixels", "at most"), ("--min-pixels", "at least")):
        fn = click.option(
            name,
            type=POSITIVE,
            default=None,
            help=f"Resize each image to {what} this many pixels (Qwen2-VL, Qwen2.5-VL: its tokens, "
            "and so the memory, grow with them). Default: the processor's.",
        )(fn)
    return fn


def _lora_options(fn):
    """--lora and its rank, alpha, dropout and targets, handed to the command as one ``lora``: a LoraSpec or None."""

    @functools.wraps(fn)
    def run(*args, lora: bool, lora_r: int, lora_alpha: float, lora_dropout: float, lora_target, **kw):
        from .train import LoraSpec

        spec = LoraSpec(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=list(lora_target) or None)
        return fn(*args, lora=spec if lora else None, **kw)

    lora_help = "Train a LoRA adapter (PEFT) instead of the weights themselves."
    target_help = (
        "Module name (q_proj) or selector the adapter goes on, inside --train (repeatable). "
        "Default: every Linear layer in scope."
    )
    options = [
        click.option("--lora", is_flag=True, help=lora_help),
        shown("--lora-r", POSITIVE, 16),
        shown("--lora-alpha", float, 32.0),
        shown("--lora-dropout", float, 0.05),
        click.option("--lora-target", multiple=True, help=target_help),
    ]
    for option in reversed(options):
        run = option(run)
    return run


def _tf32_option(fn):
    """--tf32/--no-tf32: the command runs with TF32 float32 matmuls on CUDA (PyTorch's recommendation for Ampere and
    later GPUs) or IEEE float32; the settings are put back when it returns."""

    @functools.wraps(fn)
    def run(*args, tf32: bool, **kw):
        from .precision import tf32 as tf32_matmuls

        with tf32_matmuls(tf32):
            return fn(*args, **kw)

    return click.option(
        "--tf32/--no-tf32",
        default=True,
        show_default=True,
        help="CUDA: float32 matmuls on TF32 tensor cores (10-bit mantissa, float32 accumulation); "
        "--no-tf32 for IEEE float32. No effect on the CPU or on bfloat16/float16.",
    )(run)


@cli.group("stats")
def stats_group() -> None:
    """Curvature and activation statistics on calibration data (Fisher, Gram). Data-parallel under torchrun."""


def _stats_options(fn):
    opts = [
        click.argument("model", type=click.Path(file_okay=False)),
        click.option(
            "--data",
            required=True,
            type=click.Path(dir_okay=False),
            help="Calibration set: LLaVA conversation JSON/JSONL or {image?, question, answer} JSONL.",
        ),
        click.option(
            "--images", type=click.Path(file_okay=False), help="Image folder (default: the data's folder)."
        ),
        click.option("--out", type=click.Path(dir_okay=False), help="Output .safetensors file."),
        click.option(
            "--scope",
            multiple=True,
            help="Part name, layer slice or re:<regex> (repeatable). Default: every Linear weight.",
        ),
        click.option("-n", "num", type=POSITIVE, default=None, help="Number of samples (a seeded subset)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=POSITIVE, default=8, show_default=True),
        click.option(
            "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda."
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default="float32",
            show_default=True,
            help="Model dtype (statistics are accumulated in fp32/fp64).",
        ),
        click.option(
            "--on-bad-sample", type=click.Choice(["error", "skip"]), default="error", show_default=True
        ),
        click.option(
            "--store-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True
        ),
        click.option(
            "--max-length", type=POSITIVE, default=None, help="Longest sample in tokens (default: context)."
        ),
        click.option("--force", is_flag=True, help="Replace an existing output file."),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Say what would be computed and the memory per device it takes "
            "(accounted without reading the weights).",
        ),
        click.option(
            "--memory",
            default=None,
            help="Refuse before any work when the memory per device would exceed "
            "this (e.g. 40GiB); the device's free memory is always checked.",
        ),
    ]
    fn = _pixels_options(_tf32_option(fn))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _run_stats(
    kind: str, model: str, out: str | None, dry_run: bool, scope: tuple[str, ...], num: int | None, **kw
) -> None:
    from .stats.run import compute_statistics

    if out is None and not dry_run:
        raise click.UsageError("--out is required (or --dry-run)")
    compute_statistics(
        kind,
        model,
        kw.pop("data"),
        out,
        scope=list(scope) or None,
        n=num,
        dry_run=dry_run,
        log=click.echo,
        **kw,
    )


@stats_group.command("fisher")
@_stats_options
@choice(
    "--variant",
    ["empirical", "sampled"],
    "empirical",
    help="Labels from the data, or drawn from the model's own predictions.",
)
@click.option("--all-params", is_flag=True, help="Every parameter in scope, not only Linear weights.")
def stats_fisher(**kw) -> None:
    """Diagonal Fisher of MODEL on the answer tokens of --data: F = (1/N) Σ (∇ℓᵢ)², per sample."""
    _run_stats("fisher", **kw)


@stats_group.command("gram")
@_stats_options
@choice(
    "--tokens",
    ["all", "answer"],
    "all",
    help="Which tokens' inputs count: every non-padding token, or answer tokens only.",
)
@choice(
    "--accumulate",
    ["float64", "float32"],
    "float64",
    help="Accumulator dtype: float32 halves the memory (4 bytes per entry).",
)
@click.option(
    "--no-share",
    "share",
    flag_value=False,
    default=True,
    help="One Gram per Linear even where several read the same input (q/k/v, gate/up).",
)
@choice(
    "--split",
    ["none", "modules"],
    "none",
    help="Under torchrun: each rank accumulates a share of the modules over every sample (memory / ranks) "
    "instead of every module over a share of the samples (time / ranks).",
)
def stats_gram(**kw) -> None:
    """Input Gram matrices G = Σ x xᵀ of every Linear layer in scope, with token counts. Linears that read the same
    input share one Gram; runs over disjoint --scope write files that complete each other."""
    _run_stats("gram", **kw)


@cli.command("cgm")
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.option(
    "--general-data", required=True, type=click.Path(dir_okay=False), help="General calibration set."
)
@click.option("--task-data", required=True, type=click.Path(dir_okay=False), help="Task calibration set.")
@folder_option("--general-images")
@folder_option("--task-images")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged model folder.")
@click.option(
    "--method", type=click.Choice(["cgm", "cgm_dagger", "cgm_plus"]), default="cgm", show_default=True
)
@click.option(
    "--alpha", type=float, default=None, help="Default: published (0.2 for cgm, 1.0 for cgm_dagger)."
)
@click.option("--keep", type=float, default=None, help="cgm_dagger: fraction kept per row (published 0.95).")
@click.option(
    "--scope",
    multiple=True,
    help="Default: the last 37.5% of decoder layers and lm_head (+ projector for cgm_dagger).",
)
@click.option("-n", "num", type=POSITIVE, default=16, show_default=True, help="Samples per calibration set.")
@shown("--seed", int, 0)
@shown("--batch-size", POSITIVE, 8)
@choice(
    "--task-fisher-at",
    ["base", "finetuned"],
    "base",
    help="The model the task Fisher is taken at: θ₀ as CGM's published scripts do, or θ_ft.",
)
@choice(
    "--task-fisher-variant",
    ["empirical", "sampled"],
    "empirical",
    help="Task Fisher labels from the data (published), or drawn from the model.",
)
@folder_option(
    "--stats-dir",
    help="Where the Fisher files go and are reused from (default: OUT-statistics beside OUT).",
)
@click.option("--device", default="auto", show_default=True)
@choice(
    "--dtype",
    ["float32", "bfloat16", "float16"],
    "float32",
    help="The models' dtype in the Fisher passes (the Fisher is accumulated in fp32); "
    "a Fisher file taken in another dtype is not reused.",
)
@_tf32_option
@_pixels_options
@choice("--on-bad-sample", ["error", "skip"], "error")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--dry-run", is_flag=True, help="Say what would be computed; compute and write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cgm_cmd(base: str, finetuned: str, scope: tuple[str, ...], num: int, quiet: bool, **kw) -> None:
    """CGM from two checkpoints and two calibration sets: Fisher statistics at the right models, then the merge."""
    from .chains.cgm import cgm_chain

    cgm_chain(base, finetuned, scope=list(scope) or None, n=num, log=click.echo, progress=not quiet, **kw)


@cli.command("extract-lora")
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.option("--rank", required=True, type=POSITIVE, help="The LoRA rank R (smaller weights kept whole).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The PEFT adapter folder.")
@click.option("--scope", multiple=True, help="Selectors of the tensors to extract. Default: every tensor.")
@choice("--svd", ["exact", "randomized"], "exact", help="The truncated SVD: exact, or randomized (faster).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@choice("--dtype", ["float32", "bfloat16", "float16"], "float32", help="The LoRA factors' dtype.")
@click.option(
    "--linear-only",
    is_flag=True,
    help="Leave out the changed tensors LoRA cannot carry (norms, biases, embeddings) instead of saving them "
    "whole: an adapter of Linear deltas alone, as `continual add` (LPM) takes; the card lists what was left out.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def extract_lora_cmd(base: str, finetuned: str, scope: tuple[str, ...], **kw) -> None:
    """The truncated SVD of each changed Linear's FINETUNED − BASE as a PEFT LoRA adapter (other changed modules
    saved whole); the model card lists each module's reconstruction error."""
    from .chains.extract_lora import extract_lora

    one_process("extract-lora")
    extract_lora(base, finetuned, scope=list(scope) or None, log=click.echo, **kw)


def _benchmark_options(role: str) -> Callable:
    """--benchmark NAME / --benchmark-dir DIR, repeatable in pairs; ``role``: what a benchmark is to the command."""

    def add(f: Callable) -> Callable:
        f = click.option(
            "--benchmark-dir",
            "benchmark_dirs",
            multiple=True,
            type=click.Path(file_okay=False),
            help="The folder of the files the benchmark's maintainers publish (one per --benchmark, in order).",
        )(f)
        return click.option(
            "--benchmark",
            "benchmark_names",
            multiple=True,
            help=f"A standard benchmark scored by its official metric, {role} (repeatable, each with its "
            "--benchmark-dir; `forgetless benchmarks` lists them).",
        )(f)

    return add


@cli.group("continual")
def continual_group() -> None:
    """Merge a sequence of tasks' LoRA adapters one task at a time through a state folder (MAny: LPM, and CPM
    routing with --cpm-data); or sequentially fine-tuned models with MagMax or OPCM (`continual merge`)."""


@continual_group.command("add")
@click.argument("state", type=click.Path(file_okay=False))
@click.option(
    "--adapter", required=True, type=click.Path(file_okay=False), help="The new task's PEFT LoRA adapter."
)
@click.option(
    "--gram",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="The task's Gram file, taken at the base: forgetless stats gram BASE --data TASK_DATA. "
    "Repeat it for files over disjoint --scope that together cover the adapted modules.",
)
@file_option(
    "--data",
    help="Instead of --gram: the task's data; its Gram is computed at the base (or reused).",
)
@folder_option("--images", help="--data's image folder.")
@click.option("-n", "n", type=POSITIVE, default=None, help="--data: a seeded subset of N samples.")
@_pixels_options
@click.option(
    "--dtype",
    "gram_dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="--data: the base model's dtype in the Gram pass; a Gram file taken in another dtype is not reused.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the step computes: the Gram of --data, and the LPM solves (Cholesky and triangular "
    "solves, in float64, or in float32 refined to float64 accuracy on GPUs slow in float64): "
    "auto (CUDA when present), cpu, cuda, cuda:N.",
)
@folder_option(
    "--stats-dir",
    help="Where computed Gram files go and are reused from (default: STATE-statistics beside STATE).",
)
@folder_option(
    "--out",
    help="The merged model folder (or the adapter folder with --rank). Default: update the state only.",
)
@folder_option(
    "--base",
    help="The base model (needed on the first task; later the state's own, checked).",
)
@click.option("--name", default=None, help="Task name (default: the adapter folder's name).")
@click.option(
    "--rank", type=POSITIVE, default=None, help="Write a rank-R PEFT adapter (truncated SVD), not the model."
)
@click.option("--gamma", type=float, default=None, help="Ridge γ (first task only; default 1e-4).")
@click.option(
    "--gamma-mode",
    type=click.Choice(["relative", "absolute"]),
    default=None,
    help="γ relative to the mean diagonal of the Gram sum (default), or absolute (first task only).",
)
@click.option(
    "--approx",
    type=click.Choice(["full", "diagonal"]),
    default=None,
    help="full Grams (default) or their diagonals: bounded memory (first task only).",
)
@click.option(
    "--state-dtype",
    type=click.Choice(["float32", "float64"]),
    default=None,
    help="How the state stores its sums (first task only; default float32).",
)
@file_option(
    "--cpm-data",
    help="CPM: the task's data with images (its visual prototype); the output becomes a routed model.",
)
@folder_option("--cpm-images", help="CPM: the image folder.")
@click.option("--cpm-n", type=POSITIVE, default=None, help="CPM: images for the prototype (a seeded subset).")
@click.option(
    "--tau", type=float, default=None, help="CPM routing temperature (first task only; default 0.1)."
)
@click.option(
    "--routing",
    type=click.Choice(["soft", "hard"]),
    default=None,
    help="CPM: softmax weights (default) or the nearest prototype only (first task only).",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def continual_add_cmd(state: str, routing: str | None, gram: tuple[str, ...], **kw) -> None:
    """Add one task to STATE (created on the first task) and write the merged output."""
    from .chains.continual import add_task

    one_process("continual add")

    files = list(gram) if len(gram) > 1 else (gram[0] if gram else None)
    add_task(state, hard=None if routing is None else routing == "hard", gram=files, log=click.echo, **kw)


@continual_group.command("show")
@click.argument("state", type=click.Path(file_okay=False))
def continual_show_cmd(state: str) -> None:
    """The tasks, options and sizes of a continual state."""
    from .chains.continual import show_state
    from .chains.continual_merge import is_merge_state, show_merge_state

    click.echo(show_merge_state(state) if is_merge_state(state) else show_state(state))


@continual_group.command("merge")
@click.argument("state", type=click.Path(file_okay=False))
@click.option(
    "--model",
    required=True,
    type=click.Path(file_okay=False),
    help="The model after the new task (fine-tuned from the previous task's model).",
)
@click.option(
    "--method",
    type=click.Choice(["magmax", "opcm"]),
    default=None,
    help="MagMax (per entry, the largest-magnitude task vector) or OPCM (orthogonal projections); first "
    "model only, later the state's.",
)
@folder_option("--base", help="The base model (needed on the first model; later the state's own, checked).")
@folder_option("--out", help="The merged model folder. Default: update the state only.")
@click.option("--name", default=None, help="Task name (default: the model folder's name).")
@click.option(
    "--lambda",
    "lambda_",
    type=float,
    default=None,
    help="MagMax: the scale of the selected task vector in this output (default 0.5).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="OPCM: the share of the merged update's singular values whose directions the new task vector leaves "
    "(first model only; default 0.5).",
)
@click.option(
    "--device", default="auto", show_default=True, help="OPCM: where the SVDs run (auto, cpu, cuda, cuda:N)."
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def continual_merge_cmd(state: str, **kw) -> None:
    """Merge the model after one more task into STATE (created by the first) with MagMax or OPCM, and write the
    merged model."""
    from .chains.continual_merge import merge_step

    one_process("continual merge")
    merge_step(state, log=click.echo, **kw)


@continual_group.command("eval")
@click.argument("steps", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--tasks",
    default=None,
    help="The sequence's tasks in learning order, comma-separated: JSONL files, task folders, or names under "
    "--task-root (with result JSONs only: the task names in them).",
)
@_benchmark_options("a task of the sequence, after --tasks")
@click.option("--general", default=None, help="General tasks scored too on each model folder (G per step).")
@folder_option(
    "--out",
    help="Write continual-metrics.json, continual-matrix.png and each evaluated step's result (step-T.json) here.",
)
@click.option("--split", default="test", show_default=True, help="The split a task folder is read from.")
@click.option("--limit", type=POSITIVE, default=None, help="Only the first N records of each task.")
@shown("--batch-size", POSITIVE, 8)
@folder_option(
    "--task-root", help="Where task names are looked up (default: $FORGETLESS_TASKS, else runs/tasks)."
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@choice("--dtype", ["float32", "bfloat16", "float16"], "float32")
@_tf32_option
@_pixels_options
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--force", is_flag=True, help="Replace existing files in --out.")
def continual_eval_cmd(
    steps: tuple[str, ...],
    tasks: str | None,
    benchmark_names: tuple[str, ...],
    benchmark_dirs: tuple[str, ...],
    quiet: bool,
    **kw,
) -> None:
    """MFT, MFN, MAA, BWT and Last of a task sequence, with 95% intervals, and its accuracy matrix. One STEP per
    task, in learning order: step t is the model after learning task t — a model folder (evaluated on every task)
    or the result JSON `forgetless eval` wrote for it."""
    from .eval.continual import continual_eval, markdown

    one_process("continual eval")
    if not tasks and not benchmark_names:
        raise click.UsageError("pass the sequence's --tasks and/or --benchmark")
    pairs = _benchmark_pairs(benchmark_names, benchmark_dirs)
    log = None if quiet else functools.partial(click.echo, err=True)
    click.echo(markdown(continual_eval(steps, tasks, benchmarks=pairs, progress=not quiet, log=log, **kw)))


@cli.group("testbed")
def testbed_group() -> None:
    """The mini-LLaVA testbed: SmolLM2 + a small vision tower trained here, and its generated tasks."""
    one_process("testbed")


@testbed_group.command("model")
@folder_option(
    "--out",
    help="Where to write the folder (default: the cache, ~/.cache/forgetless).",
)
def testbed_model_cmd(out: str | None) -> None:
    """Assemble the testbed's LLaVA folder (once; cached) and print its path."""
    from .testbed.build import testbed_model

    click.echo(testbed_model(out))


@testbed_group.command("tasks")
@click.option("--root", type=click.Path(file_okay=False), default="runs/tasks", show_default=True)
@click.option("--task", "names", multiple=True, help="Task name (repeatable; default: all).")
@shown("--seed", int, 0)
@click.option("--force", is_flag=True, help="Regenerate even when a task folder with this seed exists.")
def testbed_tasks_cmd(root: str, names: tuple[str, ...], seed: int, force: bool) -> None:
    """Generate the task folders (train/val/test JSONL + images) from a seed."""
    from .testbed.tasks import TASKS, write_tasks

    for name, path in write_tasks(root, names or None, seed=seed, force=force).items():
        meta = TASKS[name]
        click.echo(f"{name:11s} {meta.kind:15s} {path}")


@testbed_group.command("build")
@folder_option(
    "--out",
    help="Where vision.safetensors and build.json go (default: the package's testbed/weights).",
)
@shown("--vision-steps", POSITIVE, 600)
@shown("--align-steps", POSITIVE, 240)
@shown("--seed", int, 0)
@click.option(
    "--threads",
    type=POSITIVE,
    default=None,
    help="torch threads (default: torch's choice). Use 1 when "
    "other work shares the cores: oversubscribed threads are several times slower.",
)
@click.option(
    "--workdir", type=click.Path(file_okay=False), default=None, help="Where the training tasks go."
)
def testbed_build_cmd(
    out: str | None, vision_steps: int, align_steps: int, seed: int, threads: int | None, workdir: str | None
) -> None:
    """Train the testbed's vision tower and projector (the language model stays frozen)."""
    import torch

    from .testbed.build import build

    if threads:
        torch.set_num_threads(threads)
    build(out, vision_steps=vision_steps, align_steps=align_steps, seed=seed, workdir=workdir, log=click.echo)


@testbed_group.command("frontier")
@click.option("--task", "names", multiple=True, help="Downstream task (repeatable; default: all).")
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/testbed", show_default=True)
@click.option(
    "--test",
    "test",
    is_flag=True,
    help="Then evaluate each curve's point chosen on validation (best F keeping --keep-gain of the "
    "fine-tune's E) on the test splits; and the points chosen on the first 100 validation items (the "
    "winner's-curse gap of a small split).",
)
@click.option(
    "--keep-gain",
    type=click.FloatRange(0, 1.5, min_open=True),
    default=0.9,
    show_default=True,
    help="With --test: the share of the fine-tune's validation E a chosen point must keep.",
)
@click.option(
    "--curve",
    "curves",
    multiple=True,
    help="Run only this curve (repeatable; a label or its unambiguous prefix: wise-ft, cgm, 'spider → wise'); "
    "the other curves already measured are kept.",
)
@click.option(
    "--seed",
    "seeds",
    type=click.IntRange(0),
    multiple=True,
    help="Fine-tuning seed (repeatable; default 0, the documented recipe): each seed's fine-tunes, curves and "
    "chosen points in TASK/seed-N.",
)
def testbed_frontier_cmd(
    names: tuple[str, ...],
    workdir: str,
    test: bool,
    keep_gain: float,
    curves: tuple[str, ...],
    seeds: tuple[int, ...],
) -> None:
    """Every method's trade-off curve over its knob on the validation splits (cached; `testbed report` draws them)."""
    from .testbed import tasks as T
    from .testbed.frontier import FEW_ITEMS, curve_labels, run_chosen, run_frontier

    chosen = curve_labels(curves) if curves else None  # a misspelt curve fails before any work
    for seed in seeds or (0,):
        for name in names or T.DOWNSTREAM:
            click.echo(f"== {name}, seed {seed}")
            run_frontier(name, f"{workdir}/{name}", curves=chosen, seed=seed, log=click.echo)
            if not test:
                continue
            for items in (None, FEW_ITEMS):  # chosen on every validation item, and on the first FEW_ITEMS
                click.echo(
                    f"== {name}, seed {seed}: points chosen on {items or 'all'} validation items, on test"
                )
                run_chosen(
                    name, f"{workdir}/{name}", keep_gain=keep_gain, seed=seed, val_items=items, log=click.echo
                )


@testbed_group.command("report")
@click.option("--task", "names", multiple=True, help="Downstream task (repeatable; default: all).")
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/testbed", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="runs/testbed/results.md",
    show_default=True,
    help="The markdown report, written whole (RESULTS.md: --out RESULTS.md); the hand-written reading "
    "between its reading markers is kept.",
)
@folder_option(
    "--plots",
    help="Where the trade-off PNGs go (default: docs/results beside --out).",
)
@click.option("--keep-models", is_flag=True, help="Keep the merged folders (550 MB each).")
@click.option(
    "--no-run", is_flag=True, help="Only rebuild the report from the results.json files in --workdir."
)
@click.option(
    "--part",
    "parts",
    type=click.Choice(["tasks", "multitask", "continual"]),
    multiple=True,
    help="Run only this experiment (repeatable; default: all three, or only tasks when --task is given); the "
    "report covers every result in --workdir.",
)
def testbed_report_cmd(
    names: tuple[str, ...],
    workdir: str,
    out: str,
    plots: str | None,
    keep_models: bool,
    no_run: bool,
    parts: tuple[str, ...],
) -> None:
    """Every downstream task: fine-tune, merge with each method, evaluate on the whole test splits; the multi-task
    and continual protocols; report with 95% intervals."""
    from .testbed.report import run_report

    run_report(
        list(names) or None,
        workdir,
        out,
        plots=plots,
        keep_models=keep_models,
        run=not no_run,
        parts=parts or None,
        log=click.echo,
    )


@cli.command("sweep")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--param",
    "params",
    multiple=True,
    required=True,
    help="[METHOD:]NAME=V1,V2,... (repeatable): the grid; applies to every recipe whose method has NAME.",
)
@click.option(
    "--tasks", required=True, help="Downstream task(s), comma-separated: names, folders or JSONL files."
)
@click.option("--general", required=True, help="General task(s), comma-separated.")
@folder_option(
    "--task-root",
    help="Where task names are looked up (default: $FORGETLESS_TASKS or runs/tasks).",
)
@click.option("--split", default="val", show_default=True)
@click.option("--limit", type=POSITIVE, default=None, help="At most N samples per task.")
@click.option(
    "--min-task-ratio",
    type=float,
    default=0.98,
    show_default=True,
    help="Rule: the best general score among points with T ≥ this × T(fine-tuned).",
)
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/sweep", show_default=True)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="PNG (default: WORKDIR/sweep.png)."
)
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="JSON (default: WORKDIR/sweep.json)."
)
@shown("--batch-size", POSITIVE, 8)
@click.option(
    "--keep-gain",
    type=float,
    default=None,
    metavar="FRACTION",
    help="Rule: keep at least this fraction of the fine-tune's task gain E (e.g. 0.95), then the best F.",
)
@click.option(
    "--max-loss",
    type=float,
    default=None,
    metavar="POINTS",
    help="Rule: lose at most this many points of general score (F ≥ −POINTS), then the best E.",
)
@click.option(
    "--held-out",
    default=None,
    metavar="SPLIT",
    help="Evaluate the chosen point on this split too (e.g. test): what to expect there, with intervals.",
)
@choice(
    "--dtype",
    ["float32", "bfloat16", "float16"],
    "float32",
    help="The evaluations' model dtype (results of other dtypes are cached apart).",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
def sweep_cmd(
    recipes: tuple[str, ...],
    params: tuple[str, ...],
    tasks: str,
    general: str,
    task_root: str | None,
    split: str,
    limit: int | None,
    min_task_ratio: float,
    workdir: str,
    plot: str | None,
    out: str | None,
    batch_size: int,
    keep_gain: float | None,
    max_loss: float | None,
    held_out: str | None,
    dtype: str,
    device: str,
) -> None:
    """Evaluate a grid of merge knobs (one recipe per method); draw the trade-off (PNG) and pick the method and knob
    by a stated rule: --keep-gain, --max-loss or --min-task-ratio."""
    from pathlib import Path

    from .eval.harness import resolve_task
    from .eval.sweep import Rule, sweep

    def group(spec: str, on: str) -> dict:
        found = [resolve_task(s.strip(), split=on, task_root=task_root) for s in spec.split(",") if s.strip()]
        return {t.name: t for t in found}

    rule = Rule(min_task_ratio=min_task_ratio, keep_gain=keep_gain, max_loss=max_loss)
    where = (
        {"split": held_out, "tasks": group(tasks, held_out), "general": group(general, held_out)}
        if held_out
        else None
    )
    wd = Path(workdir)
    sweep(
        list(recipes),
        list(params),
        tasks=group(tasks, split),
        general=group(general, split),
        workdir=wd,
        split=split,
        limit=limit,
        rule=rule,
        held_out=where,
        plot=plot or wd / "sweep.png",
        out=out or wd / "sweep.json",
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        log=click.echo,
    )


def _task_options(fn):
    """--task / --general / --task-root / --split / --limit: the validation data of `learn` and `soup`."""
    for option in reversed(
        [
            click.option(
                "--task",
                "--tasks",
                "tasks",
                required=True,
                help="Downstream task(s), comma-separated: names, folders or JSONL files.",
            ),
            click.option("--general", default=None, help="General task(s), comma-separated."),
            folder_option(
                "--task-root",
                help="Where task names are looked up (default: $FORGETLESS_TASKS or runs/tasks).",
            ),
            shown("--split", str, "val"),
            click.option("--limit", type=POSITIVE, default=None, help="At most N samples per task."),
        ]
    ):
        fn = option(fn)
    return fn


@cli.command("learn")
@click.argument("recipe", type=click.Path(dir_okay=False))
@_task_options
@choice(
    "--objective",
    ["labels", "entropy"],
    "labels",
    help="labels: answer NLL on the task + general items; entropy: label-free (AdaMerging-style), the "
    "predictions' entropy on the task items + KL(base ‖ merged) on the general items.",
)
@choice("--by", ["part", "layer"], "part", help="One coefficient per part, or per decoder layer (and part).")
@shown("--steps", POSITIVE, 40)
@shown("--lr", float, 0.05, help="Adam's step on the coefficients (CGM: on log α).")
@shown("--general-weight", float, 1.0, help="Weight of the general term against the task term.")
@shown("--batch-size", POSITIVE, 8, help="Task items (and general items) per step.")
@shown("--seed", int, 0, help="Seeds the mini-batches.")
@file_option("--out", required=True, help="The learned recipe (YAML); its record beside it (.json).")
@click.option("--held-out", metavar="SPLIT", help="Merge the learned recipe and evaluate it on this split.")
@folder_option("--workdir", help="Scratch folder of --held-out (default: beside --out).")
@choice("--dtype", ["float32", "bfloat16"], "float32", help="The model's dtype while learning.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
def learn_cmd(recipe: str, tasks: str, general: str | None, out: str, held_out: str | None, **kw) -> None:
    """Learn RECIPE's coefficient (linear, task_arithmetic: λ; cgm: α) per part or per layer on validation data;
    write the learned recipe, which `forgetless merge` runs."""
    from .eval.learn import LearnOptions, learn

    one_process("learn")
    workdir = kw.pop("workdir")
    learn(
        recipe,
        task=tasks,
        general=general,
        out=out,
        options=LearnOptions(**kw),
        held_out=held_out,
        workdir=workdir,
        log=click.echo,
    )


@cli.command("soup")
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", nargs=-1, required=True, type=click.Path(file_okay=False))
@_task_options
@file_option("--out", required=True, help="The soup's linear recipe (YAML); its record beside it (.json).")
@click.option("--keep-gain", type=float, metavar="FRACTION", help="Order by sweep's --keep-gain rule, not T.")
@click.option("--max-loss", type=float, metavar="POINTS", help="Order by sweep's --max-loss rule, not T.")
@click.option("--workdir", type=click.Path(file_okay=False), default="runs/soup", show_default=True)
@shown("--batch-size", POSITIVE, 8)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
def soup_cmd(
    base: str,
    finetuned: tuple[str, ...],
    tasks: str,
    general: str | None,
    task_root: str | None,
    split: str,
    limit: int | None,
    out: str,
    keep_gain: float | None,
    max_loss: float | None,
    workdir: str,
    batch_size: int,
    device: str,
) -> None:
    """The greedy soup of FINETUNED over BASE: ranked by their validation score, each added while the uniform
    average's score does not drop; writes the linear recipe of the chosen ones."""
    from .eval.harness import EvalOptions
    from .eval.learn import task_specs
    from .eval.soup import greedy_soup
    from .eval.sweep import Rule

    one_process("soup")
    rule = (
        Rule(keep_gain=keep_gain, max_loss=max_loss)
        if keep_gain is not None or max_loss is not None
        else None
    )
    greedy_soup(
        base,
        list(finetuned),
        task=task_specs(tasks, split, task_root),
        general=task_specs(general, split, task_root),
        out=out,
        rule=rule,
        workdir=workdir,
        options=EvalOptions(split=split, limit=limit, batch_size=batch_size, device=device),
        log=click.echo,
    )


@cli.command("demo")
@click.option(
    "--workdir", type=click.Path(file_okay=False), default=None, help="Where results go (default runs/demo)."
)
@click.option(
    "--task",
    default="count_many",
    show_default=True,
    type=click.Choice(["digits", "spatial", "count_many", "tag"]),
    help="The downstream task.",
)
@click.option("--quick", is_flag=True, help="Two merges instead of seven (a smoke run).")
def demo_cmd(workdir: str | None, task: str, quick: bool) -> None:
    """The testbed end to end: fine-tune on a task, merge back with each method, evaluate, table and plot."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(workdir) if workdir else None, task=task, quick=quick, log=click.echo)


@cli.command("finetune")
@click.argument("model", type=click.Path(file_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Training set: LLaVA conversation JSON/JSONL or {image?, question, answer} JSONL.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output: a model folder (full fine-tune) or a PEFT adapter folder (--lora).",
)
@click.option(
    "--train",
    multiple=True,
    help="Part name, layer slice or re:<regex> to train (repeatable). Default: "
    "language + lm_head + projector (full), language.layers (LoRA).",
)
@_lora_options
@click.option("--steps", type=POSITIVE, default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True, help="Samples per micro-batch.")
@click.option(
    "--grad-accum", type=POSITIVE, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="On matrices only.")
@click.option(
    "--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warm-up steps."
)
@choice("--schedule", ["cosine", "constant"], "cosine")
@click.option(
    "--min-lr-ratio",
    type=float,
    default=0.1,
    show_default=True,
    help="Where the cosine ends, as a fraction of --lr (0: down to zero).",
)
@click.option(
    "--clip", type=float, default=1.0, show_default=True, help="Max gradient norm (0: no clipping)."
)
@shown("--seed", int, 0)
@click.option("--images", type=click.Path(file_okay=False), help="Image folder (default: the data's folder).")
@click.option("-n", "num", type=POSITIVE, default=None, help="Number of samples (a seeded subset).")
@file_option(
    "--replay",
    help="General samples (a --data format) mixed into every micro-batch at --replay-ratio, against forgetting.",
)
@folder_option("--replay-images", help="Image folder of --replay (default: its file's folder).")
@click.option(
    "--replay-ratio",
    type=float,
    default=None,
    help="Replayed : task samples in every micro-batch (1: half of it, 3: three quarters); "
    "--batch-size × R / (1 + R) must be a whole number.",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@choice(
    "--dtype",
    ["float32", "bfloat16"],
    "float32",
    help="bfloat16: autocast, the frozen weights held in bf16; trainable weights and optimizer state "
    "float32.",
)
@_tf32_option
@_pixels_options
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute each layer's activations in the backward instead of keeping them (less memory).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory per rank (weights, gradients, optimizer, keep rule, "
    "activations) from the model built on the meta device; train nothing.",
)
@click.option(
    "--fsdp",
    is_flag=True,
    help="Shard the model with FSDP2 over the torchrun ranks (each holds its share "
    "of the weights, gradients, optimizer state and keep rule) instead of DDP's whole copy per rank.",
)
@click.option(
    "--ranks",
    type=POSITIVE,
    default=None,
    help="With --dry-run: the number of processes to account for (default: torchrun's).",
)
@click.option(
    "--max-length", type=POSITIVE, default=None, help="Longest sample in tokens (default: context)."
)
@choice("--on-bad-sample", ["error", "skip"], "error")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Data loader processes per rank, encoding "
    "the coming batches while the model trains (0: in the main process). Default: up to 2, none when "
    "every sample stays encoded in memory.",
)
@choice(
    "--keep",
    ["none", "spider", "magnitude_mask", "ewc", "l2sp"],
    "none",
    help="Keep what the pre-trained weights knew (full fine-tune only): after every step pull them back (SPIDER) "
    "or reset the top-50% |θ₀| entries (MagnitudeMask); or penalise λ/2 Σ F (θ − θ₀)² in the loss (EWC, with "
    "--fisher; L2-SP: F = 1).",
)
@file_option(
    "--fisher",
    help="--keep ewc: the general Fisher at θ₀ (`forgetless stats fisher` over the --train scope).",
)
@click.option("--strength", type=float, default=None, help="--keep ewc / l2sp: the penalty's λ.")
@folder_option(
    "--init-adapter",
    help="Continue training this PEFT adapter (--lora, same rank, alpha and targets): sequential "
    "fine-tuning, one task after another.",
)
@file_option(
    "--optimizer-fisher",
    help="Also write AdamW's squared gradients, averaged over the run, as a task Fisher statistics file "
    "(full fine-tune; for `forgetless merge` / `cgm`, no extra pass over the data).",
)
@click.option(
    "--tensorboard/--no-tensorboard",
    default=True,
    show_default=True,
    help="TensorBoard event files: OUT.tensorboard/RUN while training, OUT/runs/RUN after "
    "(rank 0 only; needs the tensorboard package).",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def finetune_cmd(
    model: str,
    train: tuple[str, ...],
    lora: Any,
    clip: float,
    num: int | None,
    optimizer_fisher: str | None,
    **kw,
) -> None:
    """Fine-tune MODEL on --data (answer tokens only): AdamW, warm-up + cosine, clipping, accumulation."""
    from .checkpoint.guard import check_output
    from .stats.distributed import dist_info
    from .train import finetune
    from .train.moments import OptimizerFisher

    if optimizer_fisher is not None and lora is not None:
        raise ForgetlessError(
            "--optimizer-fisher keeps the weights' squared gradients; a LoRA run has none",
            remedy="drop --lora or --optimizer-fisher",
        )
    if optimizer_fisher is not None and kw["fsdp"]:
        raise ForgetlessError(
            "--optimizer-fisher saves AdamW's state, which --fsdp shards across the ranks",
            remedy="drop --fsdp (DDP keeps the whole state on every rank), or compute the Fisher "
            "with `forgetless stats fisher`",
        )
    if optimizer_fisher is not None:
        check_output(
            optimizer_fisher,
            [model, kw["data"], kw["images"], kw["init_adapter"], kw["replay"], kw["replay_images"]],
            force=kw["force"],
            option="--optimizer-fisher",
        )
    moments = OptimizerFisher() if optimizer_fisher is not None else None
    out = kw.pop("out")
    report = finetune(
        model,
        kw.pop("data"),
        out,
        train=list(train) or None,
        lora=lora,
        clip=clip or None,
        n=num,
        log=click.echo,
        hook=moments,
        **kw,
    )
    if (
        report is not None and moments is not None and dist_info()[0] == 0
    ):  # under DDP every rank holds the same state; rank 0 writes
        click.echo(f"wrote {moments.save(optimizer_fisher, out)}: the optimizer's task Fisher")


@cli.command("eval")
@click.argument("model", type=click.Path(file_okay=False))
@click.option(
    "--tasks",
    default=None,
    help="Downstream tasks, comma-separated: JSONL files, task folders, or names under --task-root.",
)
@click.option(
    "--general",
    default=None,
    help="General tasks (visual or text, from task.json or the data), comma-separated, as --tasks.",
)
@click.option("--split", default="test", show_default=True, help="The split a task folder is read from.")
@click.option("--limit", type=POSITIVE, default=None, help="Only the first N records of each task.")
@shown("--batch-size", POSITIVE, 8)
@_benchmark_options("as a general task")
@click.option(
    "--max-new-tokens",
    type=POSITIVE,
    default=None,
    help="Longest generated answer [default: 32; a benchmark's own].",
)
@folder_option(
    "--task-root",
    help="Where task names are looked up (default: $FORGETLESS_TASKS, else runs/tasks).",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@_tf32_option
@_pixels_options
@file_option("--out", help="Write the results (JSON) here.")
@click.option(
    "--base", type=click.Path(dir_okay=False), default=None, help="The base model's result JSON: adds E, F."
)
@file_option(
    "--finetuned",
    help="The fine-tuned model's result JSON: adds its row and the gain kept.",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def eval_cmd(
    model: str,
    tasks: str | None,
    general: str | None,
    benchmark_names: tuple[str, ...],
    benchmark_dirs: tuple[str, ...],
    quiet: bool,
    **kw,
) -> None:
    """Score MODEL on task splits (multiple choice by log-likelihood, else exact match) and standard benchmarks
    (their official metric); print T, G, E, F."""
    from .eval.report import run_eval

    if not tasks and not general and not benchmark_names:
        raise click.UsageError("pass --tasks, --general and/or --benchmark")
    pairs = _benchmark_pairs(benchmark_names, benchmark_dirs)
    run_eval(model, tasks, general, benchmarks=pairs, progress=not quiet, log=click.echo, **kw)


def _benchmark_pairs(names: tuple[str, ...], dirs: tuple[str, ...]) -> list[tuple[str, str]]:
    """(--benchmark, --benchmark-dir) pairs, given one each in the same order."""
    if len(names) != len(dirs):
        raise click.UsageError("give each --benchmark its --benchmark-dir (one each, in the same order)")
    return list(zip(names, dirs))


def _os_error_line(e: OSError) -> str:
    """One line for an operating-system failure: the path, what the system said, and what to do."""
    where = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    remedy = {
        errno.ENOSPC: "free space on that disk, or write the output to another disk",
        errno.EDQUOT: "free space within your quota, or write the output elsewhere",
        errno.EACCES: "write to a folder you may write to (or fix its permissions)",
        errno.EPERM: "write to a folder you may write to (or fix its permissions)",
        errno.EROFS: "the file system is read-only: write the output to another one",
        errno.ENOENT: "check the path",
        errno.EMFILE: "raise the open-file limit (ulimit -n)",
    }.get(e.errno or -1, "check the path and the disk")
    what = e.strerror or type(e).__name__
    return f"{where}: {what} — {remedy}" if where else f"{what} — {remedy}"


LOWER = {
    "merge": "--memory (large tensors are then merged in blocks of rows), or fewer threads",
    "stats": "--batch-size, --max-length, --dtype bfloat16, or fewer modules (--scope)",
    "cgm": "--batch-size or fewer modules (--scope)",
    "eval": "--batch-size or --dtype bfloat16",
    "sweep": "--batch-size",
    "finetune": "--batch-size (raise --grad-accum to keep the step's samples), --max-length, --dtype bfloat16, "
    "--lora, or fewer modules (--train)",
    "continual": "--approx diagonal, --state-dtype float32, or a smaller -n",
}


def _out_of_memory(e: BaseException) -> bool:
    """CPU MemoryError, CUDA's torch.OutOfMemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (
        isinstance(e, MemoryError)
        or (oom is not None and isinstance(e, oom))
        or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
    )


def _memory_line(e: BaseException, args: list[str]) -> str:
    """One line for an out-of-memory: the command, the allocation that failed (when its message says), what to
    lower."""
    import re

    from .checkpoint.writer import human_bytes

    command = next((a for a in args if not a.startswith("-")), "")
    asked = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGTP]?i?B)", str(e))
    size = "" if asked is None else human_bytes(int(asked[1])) if asked[1] else asked[2]
    gpu = "GPU " if "CUDA" in str(e) else ""
    what = f": {size} could not be allocated" if size else ""
    lower = LOWER.get(command, "--batch-size, --memory, --dtype bfloat16, or fewer modules (--scope)")
    return f"out of {gpu}memory in `forgetless {command}`{what} — lower {lower}"


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (what batch schedulers send) unwinds like Ctrl-C: temporary folders are removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """The command line's error boundary: a user error (ours, the operating system's) is one line and exit
    status 2; an unexpected error one line asking for a report, its traceback only with ``--debug``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        cli.main(args=args, prog_name="forgetless", standalone_mode=False)
    except ForgetlessError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        if isinstance(
            e, getattr(click.exceptions, "NoArgsIsHelpError", ())
        ):  # a bare group: its help, as before
            e.show()
        else:
            hint = f" — see '{e.ctx.command_path} -h'" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:
        if debug:
            raise
        click.echo(f"error: {_os_error_line(e)}", err=True)
        sys.exit(2)
    except Exception as e:
        if debug:
            raise
        if _out_of_memory(e):
            click.echo(f"error: {_memory_line(e, args)}", err=True)
            sys.exit(2)
        click.echo(
            f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — this is a "
            "bug in forgetless: please report it with the command line; --debug shows the traceback",
            err=True,
        )
        sys.exit(1)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
