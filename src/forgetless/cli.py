"""The `forgetless` command. Every subcommand is a thin wrapper over the Python API."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import ForgetlessError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forgetless")
def cli() -> None:
    """Adapt multimodal LLMs to a task without losing what they knew."""


@cli.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (overrides the recipe's `out`).")
@click.option("--dry-run", is_flag=True, help="Check everything, print the plan and a peak-memory estimate; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge_cmd(recipe: str, out: str | None, dry_run: bool, force: bool, quiet: bool) -> None:
    """Merge checkpoints as RECIPE.yaml describes."""
    from .engine import merge

    merge(recipe, out=out, force=force, dry_run=dry_run, progress=not quiet, log=click.echo)


@cli.command("inspect")
@click.argument("model")
@click.option("--layout", default=None, help="Override the detected layout family.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: str, layout: str | None, as_json: bool) -> None:
    """Layout, parts (parameter counts, dtypes) and adapters of MODEL (a folder or DIR+ADAPTER)."""
    from .inspect import format_inspection, inspect_json, inspect_model

    info = inspect_model(model, layout)
    click.echo(inspect_json(info) if as_json else format_inspection(info))


@cli.command("methods")
def methods_cmd() -> None:
    """The merge methods and their parameters."""
    from .methods import METHODS
    from .methods.registry import REQUIRED

    seen = set()
    for key, spec in sorted(METHODS.items()):
        if spec.name in seen:
            continue
        seen.add(spec.name)
        params = ", ".join(f"{p}={'(required)' if d is REQUIRED else d}"
                           + (" [per model]" if p in spec.per_model else "") for p, d in spec.params.items())
        aliases = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        needs = f"\n    needs statistics: {', '.join(spec.needs)}" if spec.needs else ""
        click.echo(f"{spec.name}{aliases}: {spec.doc}\n    {params}{needs}")


@cli.group("stats")
def stats_group() -> None:
    """Curvature and activation statistics on calibration data (Fisher, Gram). Data-parallel under torchrun."""


def _stats_options(fn):
    opts = [
        click.argument("model", type=click.Path(file_okay=False)),
        click.option("--data", required=True, type=click.Path(dir_okay=False),
                     help="Calibration set: LLaVA conversation JSON/JSONL or {image?, question, answer} JSONL."),
        click.option("--images", type=click.Path(file_okay=False), help="Image folder (default: the data's folder)."),
        click.option("--out", type=click.Path(dir_okay=False), help="Output .safetensors file."),
        click.option("--scope", multiple=True, help="Part name, layer slice or re:<regex> (repeatable). "
                     "Default: every Linear weight."),
        click.option("-n", "num", type=int, default=None, help="Number of samples (a seeded subset)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True, help="Model dtype (statistics are accumulated in fp32/fp64)."),
        click.option("--on-bad-sample", type=click.Choice(["error", "skip"]), default="error", show_default=True),
        click.option("--store-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                     show_default=True),
        click.option("--max-length", type=int, default=None, help="Longest sample in tokens (default: context)."),
        click.option("--force", is_flag=True, help="Replace an existing output file."),
        click.option("--dry-run", is_flag=True, help="Say what would be computed and the memory it takes."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _run_stats(kind: str, model: str, out: str | None, dry_run: bool, scope: tuple[str, ...], num: int | None,
               **kw) -> None:
    from .stats.run import compute_statistics

    if out is None and not dry_run:
        raise click.UsageError("--out is required (or --dry-run)")
    compute_statistics(kind, model, kw.pop("data"), out, scope=list(scope) or None, n=num, dry_run=dry_run,  # type: ignore[arg-type]
                       log=click.echo, **kw)


@stats_group.command("fisher")
@_stats_options
@click.option("--variant", type=click.Choice(["empirical", "sampled"]), default="empirical", show_default=True,
              help="Labels from the data, or drawn from the model's own predictions.")
@click.option("--all-params", is_flag=True, help="Every parameter in scope, not only Linear weights.")
def stats_fisher(**kw) -> None:
    """Diagonal Fisher of MODEL on the answer tokens of --data: F = (1/N) Σ (∇ℓᵢ)², per sample."""
    _run_stats("fisher", **kw)


@stats_group.command("gram")
@_stats_options
@click.option("--tokens", type=click.Choice(["all", "answer"]), default="all", show_default=True,
              help="Which tokens' inputs count: every non-padding token, or answer tokens only.")
@click.option("--accumulate", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="float32 uses compensated (Kahan) sums.")
def stats_gram(**kw) -> None:
    """Input Gram matrices G = Σ x xᵀ of every Linear layer in scope, with token counts."""
    _run_stats("gram", **kw)


@cli.command("cgm")
@click.argument("base", type=click.Path(file_okay=False))
@click.argument("finetuned", type=click.Path(file_okay=False))
@click.option("--general-data", required=True, type=click.Path(dir_okay=False), help="General calibration set.")
@click.option("--task-data", required=True, type=click.Path(dir_okay=False), help="Task calibration set.")
@click.option("--general-images", type=click.Path(file_okay=False), default=None)
@click.option("--task-images", type=click.Path(file_okay=False), default=None)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged model folder.")
@click.option("--method", type=click.Choice(["cgm", "cgm_dagger", "cgm_plus"]), default="cgm", show_default=True)
@click.option("--alpha", type=float, default=None, help="Default: published (0.2 for cgm, 1.0 for cgm_dagger).")
@click.option("--keep", type=float, default=None, help="cgm_dagger: fraction kept per row (published 0.95).")
@click.option("--scope", multiple=True, help="Default: the last 37.5% of decoder layers and lm_head (+ projector "
              "for cgm_dagger).")
@click.option("-n", "num", type=int, default=16, show_default=True, help="Samples per calibration set.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--task-fisher-at", type=click.Choice(["finetuned", "base"]), default="finetuned", show_default=True)
@click.option("--stats-dir", type=click.Path(file_okay=False), default=None,
              help="Where the Fisher files go and are reused from (default: OUT-statistics beside OUT).")
@click.option("--device", default="auto", show_default=True)
@click.option("--on-bad-sample", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--dry-run", is_flag=True, help="Say what would be computed; compute and write nothing.")
def cgm_cmd(base: str, finetuned: str, scope: tuple[str, ...], num: int, **kw) -> None:
    """CGM from two checkpoints and two calibration sets: Fisher statistics at the right models, then the merge."""
    from .cgm_chain import cgm_chain

    cgm_chain(base, finetuned, scope=list(scope) or None, n=num, log=click.echo, **kw)


@cli.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where results go (default runs/demo).")
@click.option("--quick", is_flag=True, help="Fewer steps and merges (a smoke run).")
def demo_cmd(workdir: str | None, quick: bool) -> None:
    """Fine-tune the embedded SmolLM2 on a generated task, merge it back with each method, print the table."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(workdir) if workdir else None, quick=quick)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="forgetless", standalone_mode=False)
    except ForgetlessError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
