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

    seen = set()
    for key, spec in sorted(METHODS.items()):
        if spec.name in seen:
            continue
        seen.add(spec.name)
        params = ", ".join(f"{p}={'(required)' if d is __import__('inspect').Parameter.empty else d}"
                           + (" [per model]" if p in spec.per_model else "") for p, d in spec.params.items())
        aliases = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        needs = f"\n    needs statistics: {', '.join(spec.needs)}" if spec.needs else ""
        click.echo(f"{spec.name}{aliases}: {spec.doc}\n    {params}{needs}")


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
