"""The CLI wraps the API: inspect, methods, merge --dry-run; the shipped example recipes are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_llama

from forgetless.checkpoint.reader import CheckpointReader
from forgetless.cli import main
from forgetless.engine import resolve_params
from forgetless.methods import METHODS
from forgetless.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    recipe = load_recipe(path)
    spec = METHODS[recipe.method]
    params = resolve_params(recipe, spec)
    for p in spec.per_model:
        assert len(params[spec.arg(p)]) == len(recipe.models)


def test_inspect_reports_layout_and_part_counts(tiny_llava_dir, capsys):
    main(["inspect", str(tiny_llava_dir)])
    out = capsys.readouterr().out
    reader = CheckpointReader(tiny_llava_dir)
    assert "layout llava_hf" in out and "(3 decoder layers)" in out
    total = sum(reader.info(n).numel for n in reader.names())
    assert f"{total:,} parameters" in out
    n_proj = sum(1 for n in reader.names() if "multi_modal_projector" in n)
    assert any(line.split()[:2] == ["projector", str(n_proj)] for line in out.splitlines())


def test_methods_lists_parameters(capsys):
    main(["methods"])
    out = capsys.readouterr().out
    assert "ties:" in out and "density=0.5 in (0, 1] [per model]" in out and "alias: wise_ft" in out
    assert "sign=total (total|frequency)" in out  # a Literal's choices
    assert "rescale=true (true|false|l1)" in out  # written as YAML
    assert (
        "\nopcm: OPCM" in out and "alpha=0.5 in [0, 1]" in out
    )  # run one task at a time, not a registry merge
    for name in ("slerp", "model_stock", "breadcrumbs", "della", "tsv_m", "iso_c", "iso_cts", "magmax"):
        assert f"\n{name}:" in "\n" + out


def test_merge_dry_run_prints_plan(tmp_path, capsys):
    base = build_tiny_llama(tmp_path / "base", seed=0)
    ft = build_tiny_llama(tmp_path / "ft", seed=1)
    r = tmp_path / "r.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(base),
                "models": [str(ft)],
                "scope": {"include": ["language.layers[-1:]"], "outside": "base"},
            }
        )
    )
    main(["merge", str(r), "--out", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    n_last = sum(1 for n in CheckpointReader(base).names() if ".layers.2." in n)
    assert any(line.split()[:3] == ["language.layers", "method", str(n_last)] for line in out.splitlines())
    assert "peak memory estimate" in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv", [["merge", "recipe.yaml"], ["continual", "add", "state", "--adapter", "a"], ["testbed", "model"]]
)
def test_commands_that_are_not_data_parallel_refuse_several_processes(argv, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"`forgetless {' '.join(argv[: 2 if argv[0] == 'continual' else 1])}` runs on one process" in err
    assert "without torchrun" in err and not (tmp_path / "state").exists()


def test_help_lists_debug_and_cgm_quiet_and_prints_percent_once(capsys):
    for argv, want in (
        (["--help"], "--debug"),
        (["cgm", "--help"], "--quiet"),
        (["finetune", "--help"], "50% |θ₀|"),
    ):
        main(argv)
        out = " ".join(capsys.readouterr().out.split())  # click wraps help text
        assert want in out and "%%" not in out, argv
