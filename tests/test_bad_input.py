"""Bad input: a one-line error naming the file and the remedy, exit code 2, inputs untouched, no output left."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_llama
from safetensors.torch import load_file, save_file

from forgetless.cli import main


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def ws(tmp_path):
    base = build_tiny_llama(tmp_path / "base", seed=0)
    ft = build_tiny_llama(tmp_path / "ft", seed=1)
    return tmp_path, base, ft


def fail(ws_root: Path, recipe: dict | str, *args: str, out: Path | None = None, capsys=None) -> str:
    """Run `forgetless merge`, expect exit 2, return the one-line message; check nothing was left behind."""
    out = out or ws_root / "out"
    rpath = ws_root / "recipe.yaml"
    rpath.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    before = {d.name: digest(d) for d in ws_root.iterdir() if d.is_dir()}
    existed = out.exists()
    with pytest.raises(SystemExit) as e:
        main(["merge", str(rpath), "--out", str(out), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    after = {d.name: digest(d) for d in ws_root.iterdir() if d.is_dir() and d.name in before}
    assert after == before  # inputs (and a pre-existing output) untouched
    assert out.exists() == existed
    assert not [p for p in ws_root.rglob(".*forgetless-*")]  # no temporary folder
    return err


def recipe(base, *models, **extra):
    return {"method": "task_arithmetic", "base": str(base), "models": [str(m) for m in models], **extra}


def test_truncated_safetensors(ws, capsys):
    root, base, ft = ws
    f = ft / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert str(f) in err and "truncated" in err and "download or save it again" in err


def test_corrupt_safetensors_header(ws, capsys):
    root, base, ft = ws
    f = ft / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert str(f) in err and "corrupt safetensors header" in err


def test_missing_shard(ws, capsys):
    root, base, ft = ws
    sd = load_file(str(ft / "model.safetensors"))
    (ft / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(ft / fname))
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (ft / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ft / "model-00002-of-00002.safetensors").unlink()
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert "model-00002-of-00002.safetensors" in err and "missing shard" in err and "fetch" in err


def test_mismatched_shapes_are_all_listed(ws, capsys):
    root, base, ft = ws
    sd = load_file(str(ft / "model.safetensors"))
    import torch

    sd["model.embed_tokens.weight"] = torch.zeros(130, 32)  # a resized vocabulary
    sd["lm_head.weight"] = torch.zeros(130, 32)
    del sd["model.norm.weight"]
    save_file(sd, str(ft / "model.safetensors"))
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert "3 tensors differ" in err and "model.embed_tokens.weight [130, 32] vs base [128, 32]" in err
    assert "lm_head.weight" in err and "model.norm.weight missing" in err and str(ft) in err


def test_unknown_method(ws, capsys):
    root, base, ft = ws
    err = fail(root, {**recipe(base, ft), "method": "magic"}, capsys=capsys)
    assert "recipe.yaml" in err and "unknown method 'magic'" in err and "ties" in err


def test_missing_model(ws, capsys):
    root, base, _ = ws
    err = fail(root, recipe(base, root / "nope"), capsys=capsys)
    assert str(root / "nope") in err and "not found" in err


def test_output_inside_an_input(ws, capsys):
    root, base, ft = ws
    err = fail(root, recipe(base, ft), out=ft / "merged", capsys=capsys)
    assert "--out lies inside an input" in err and "outside every input" in err
    err = fail(root, recipe(base, ft), out=base, capsys=capsys)
    assert "--out is an input" in err
    err = fail(root, recipe(base, ft), out=root, capsys=capsys)
    assert "--out contains an input" in err


def test_existing_output_needs_force(ws, capsys):
    root, base, ft = ws
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert "already exists" in err and "--force" in err
    main(["merge", str(root / "recipe.yaml"), "--out", str(root / "out"), "--quiet", "--force"])
    assert not (root / "out" / "keep.txt").exists() and (root / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"modles": []}, "modles: unknown key"),
        ({"models": [{"model": "x", "weight": 1}], "parameters": {"lambda": "big"}}, None),
        ({"scope": {"outside": "nowhere"}}, "scope.outside"),
        ({"models": []}, "models"),
    ],
)
def test_recipe_errors_name_the_key(ws, capsys, bad, key):
    root, base, ft = ws
    r = {**recipe(base, ft), **bad}
    if key is None:  # a parameter the method does not take
        r = {**recipe(base, ft), "parameters": {"lamda": 1.0}}
        key = "parameters.lamda"
    err = fail(root, r, capsys=capsys)
    assert key in err and "recipe.yaml" in err


def test_a_parameter_outside_its_choices_fails_before_any_work(ws, capsys):
    root, base, ft = ws
    err = fail(
        root, {**recipe(base, ft), "method": "ties", "parameters": {"sign": "majority"}}, capsys=capsys
    )
    assert "parameters.sign: 'majority' is not one of total, frequency" in err


def test_invalid_yaml_names_the_line(ws, capsys):
    root, _, _ = ws
    err = fail(root, "method: ties\nbase: [unclosed\n", capsys=capsys)
    assert "invalid YAML at line" in err


def test_unreadable_bin(ws, capsys):
    root, base, ft = ws
    (ft / "model.safetensors").unlink()
    (ft / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    err = fail(root, recipe(base, ft), capsys=capsys)
    assert "pytorch_model.bin" in err and "cannot read" in err


def test_an_adapter_given_as_a_model(ws, capsys):
    root, base, _ = ws
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    shutil.copy(base / "config.json", adapter / "config.json")
    err = fail(root, recipe(base, adapter), capsys=capsys)
    assert "PEFT adapter" in err and "BASE_DIR+ADAPTER_DIR" in err
