"""Damaged or hostile adapters and configs: one named line and exit code 2 from `forgetless merge`, never "a bug",
the inputs unchanged and no output left."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_llava, tiny_llava_model
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from test_lora import train_adapter

from forgetless.cli import main
from forgetless.recipe import load_recipe

Q_A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny LLaVA base and two PEFT adapters of rank 4 on q_proj and v_proj: (root, base, [a0, a1])."""
    root = tmp_path_factory.mktemp("hostile")
    base = build_tiny_llava(root / "base")
    for i in range(2):
        train_adapter(
            tiny_llava_model(),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            root / f"a{i}",
            seed=i + 1,
        )
    return root, base, [root / "a0", root / "a1"]


def digest(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in folders
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def damaged(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter `src` with `config` keys replaced and `tensors(state_dict)` applied to its weights."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = {**json.loads((src / "adapter_config.json").read_text()), **config}
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(str(dst / "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


def refused(ws, tmp_path: Path, recipe: dict | str | bytes, *args: str, capsys) -> str:
    """Run `forgetless merge` on `recipe`: exit 2, one line that is not a bug report, inputs and output untouched."""
    rpath = tmp_path / "recipe.yaml"
    if isinstance(recipe, bytes):
        rpath.write_bytes(recipe)
    else:
        rpath.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = tmp_path / "out"
    before = digest(ws[0], tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(rpath), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "this is a bug" not in err, err
    assert digest(ws[0], tmp_path) == before
    assert not out.exists()
    return err


def adapter_recipe(ws, adapter: Path, method: str = "lora_ties") -> dict:
    return {"method": method, "base": str(ws[1]), "models": [str(ws[2][0]), str(adapter)]}


def fold_in_recipe(ws, adapter: Path) -> dict:
    """The BASE+ADAPTER path: a weight-space merge of the base with the adapter folded in."""
    return {"method": "task_arithmetic", "base": str(ws[1]), "models": [f"{ws[1]}+{adapter}"]}


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("key, value", [(Q_A, float("nan")), (Q_B, float("inf"))])
@pytest.mark.parametrize("build", [adapter_recipe, fold_in_recipe])
def test_nan_or_inf_in_a_factor_names_the_tensor(ws, tmp_path, capsys, key, value, build):
    def spoil(sd):
        sd[key][1, 2] = value

    bad = damaged(ws[2][1], tmp_path / "bad", tensors=spoil)
    err = refused(ws, tmp_path, build(ws, bad), capsys=capsys)
    assert f"{bad / 'adapter_model.safetensors'}: tensor '{key}': the adapter holds NaN or Inf values" in err
    assert "earlier checkpoint" in err


@pytest.mark.parametrize(
    "config, problem",
    [
        (
            {"rank_pattern": "q_proj"},
            "rank_pattern must be a mapping of module patterns to numbers, got 'q_proj'",
        ),
        ({"alpha_pattern": None}, "alpha_pattern must be a mapping of module patterns to numbers, got None"),
        (
            {"alpha_pattern": {"q_proj": -16}},
            "alpha_pattern['q_proj'] must be a positive finite number, got -16",
        ),
        ({"rank_pattern": {"(q_proj": 4}}, "rank_pattern: '(q_proj' is not a regular expression"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number, got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number, got inf"),
        ({"lora_alpha": True}, "lora_alpha must be a positive finite number, got True"),
        ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
        ({"modules_to_save": 5}, "modules_to_save must be a list of module names, got 5"),
        (
            {"modules_to_save": "multi_modal_projector"},
            "modules_to_save must be a list of module names, got 'multi_",
        ),
    ],
)
@pytest.mark.parametrize("build", [adapter_recipe, fold_in_recipe])
def test_bad_adapter_config_values_are_named(ws, tmp_path, capsys, config, problem, build):
    bad = damaged(ws[2][1], tmp_path / "bad", config=config)
    err = refused(ws, tmp_path, build(ws, bad), capsys=capsys)
    assert f"{bad / 'adapter_config.json'}: {problem}" in err


def huge_factors(sd):
    for k in sd:
        sd[k] = sd[k] * 1e30


@pytest.mark.parametrize(
    "config, tensors, peaks",
    [
        ({"lora_alpha": 1e300}, None, "scale 2.5e+299, rank 4"),
        (None, huge_factors, "scale 2, rank 4, largest |A| "),
    ],
)
@pytest.mark.parametrize("build", [adapter_recipe, fold_in_recipe])
def test_an_update_beyond_float32_is_refused_before_it_overflows(
    ws, tmp_path, capsys, config, tensors, peaks, build
):
    """Finite but absurd: the bound scale · rank · max|A| · max|B| on |ΔW| passes 1e30 (merges overflowed)."""
    bad = damaged(ws[2][1], tmp_path / "bad", config=config, tensors=tensors)
    err = refused(ws, tmp_path, build(ws, bad), capsys=capsys)
    assert f"{bad}: the update of model.language_model.layers.0.self_attn.q_proj can reach " in err
    assert peaks in err and "far beyond any trained adapter's" in err


@pytest.mark.parametrize("build", [adapter_recipe, fold_in_recipe])
def test_one_dimensional_lora_b_says_the_shards_were_not_gathered(ws, tmp_path, capsys, build):
    def flatten(sd):
        sd[Q_B] = sd[Q_B].flatten()

    bad = damaged(ws[2][1], tmp_path / "bad", tensors=flatten)
    err = refused(ws, tmp_path, build(ws, bad), capsys=capsys)
    assert f"tensor '{Q_B}': LoRA factor of shape [128]" in err
    assert "shards were not gathered before save_pretrained()" in err and "GatheredParameters" in err


def test_fold_refuses_an_adapter_of_another_model_unless_allowed(ws, tmp_path, capsys):
    _, base, (_, a1) = ws
    other = damaged(a1, tmp_path / "other", config={"base_model_name_or_path": "org/another-model"})
    recipe = adapter_recipe(ws, other, "copa")
    err = refused(ws, tmp_path, recipe, "--fold", capsys=capsys)
    assert f"models[1] {other}: 'org/another-model'" in err and "--allow-other-model" in err
    odd = damaged(a1, tmp_path / "odd", config={"base_model_name_or_path": "x\x00" + "y" * 5000})
    err = refused(ws, tmp_path, adapter_recipe(ws, odd, "copa"), "--fold", capsys=capsys)
    assert f"models[1] {odd}: 'x\\x00yyy" in err
    refused(ws, tmp_path, {**recipe, "fold": True}, capsys=capsys)  # the recipe key refuses the same
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(
        [
            "merge",
            str(tmp_path / "recipe.yaml"),
            "--fold",
            "--allow-other-model",
            "--quiet",
            "--out",
            str(tmp_path / "allowed"),
        ]
    )
    assert (tmp_path / "allowed" / "model.safetensors").is_file()
    main(
        ["merge", str(tmp_path / "recipe.yaml"), "--quiet", "--out", str(tmp_path / "adapter")]
    )  # no fold: kept
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for i, name in enumerate((str(base), f"llava-hf/{base.name}")):  # its own path, or a Hub id of its name
        same = damaged(a1, tmp_path / f"same{i}", config={"base_model_name_or_path": name})
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(adapter_recipe(ws, same, "copa")))
        main(
            [
                "merge",
                str(tmp_path / "recipe.yaml"),
                "--fold",
                "--quiet",
                "--out",
                str(tmp_path / f"same{i}out"),
            ]
        )
        assert (tmp_path / f"same{i}out" / "model.safetensors").is_file()
    # MODEL+ADAPTER in a full-model merge folds the adapter into MODEL: the same rule
    folded = {"method": "task_arithmetic", "base": str(base), "models": [f"{base}+{other}"]}
    err = refused(ws, tmp_path, folded, capsys=capsys)
    assert f"models[0] {other}: 'org/another-model' is not {base}" in err
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**folded, "allow_other_model": True}))
    main(["merge", str(tmp_path / "recipe.yaml"), "--quiet", "--out", str(tmp_path / "plus")])
    assert (tmp_path / "plus" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- configs
DEEP = "[" * 50_000 + "]" * 50_000


def test_deeply_nested_adapter_config_is_refused_by_depth(ws, tmp_path, capsys):
    bad = damaged(ws[2][1], tmp_path / "bad")
    (bad / "adapter_config.json").write_text(DEEP)
    err = refused(ws, tmp_path, adapter_recipe(ws, bad), capsys=capsys)
    assert f"{bad / 'adapter_config.json'}: JSON nested deeper than 100 levels" in err
    (bad / "adapter_config.json").write_text('{"r": ' + "4" * 5000 + "}")  # more digits than int() converts
    err = refused(ws, tmp_path, adapter_recipe(ws, bad), capsys=capsys)
    assert f"{bad / 'adapter_config.json'}: invalid JSON (Exceeds the limit (4300 digits)" in err
    cfg = json.loads((ws[2][1] / "adapter_config.json").read_text())  # brackets inside a string do not nest
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "notes": "[{" * 200 + '\\"]'}))
    main(["merge", str(tmp_path / "recipe.yaml"), "--quiet", "--out", str(tmp_path / "ok")])
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "text, problem",
    [
        (DEEP, "YAML nested deeper than 100 levels"),
        (
            '{"method": "ties", "base": "b", "models": ' + "[" * 5000 + "]" * 5000 + "}",
            "YAML nested deeper than 100",
        ),
        (
            "method: ties\nbase: b\nmodels: &m [*m]\n",
            "YAML alias inside its own anchor (a structure that contains itself)",
        ),
        (
            "method: ties\nbase: b\nmodels: [a]\nseed: 2024-13-45\n",
            "invalid YAML value (month must be in 1..12) (line 4)",
        ),
        (
            "method: ties\nbase: b\nmodels: [a]\nseed: " + "7" * 5000,
            "invalid YAML value (Exceeds the limit (4300 digits)",
        ),
    ],
)
def test_deep_self_referring_or_unconvertible_recipe_is_refused(ws, tmp_path, capsys, text, problem):
    err = refused(ws, tmp_path, text, capsys=capsys)
    assert f"{tmp_path / 'recipe.yaml'}: {problem}" in err


def test_duplicated_yaml_keys_are_refused_naming_the_key_and_lines(ws, tmp_path, capsys):
    _, base, (a0, a1) = ws
    text = f"method: lora_ties\nbase: {base}\nmodels: [{a0}, {a1}]\nparameters:\n  density: 0.5\n  density: 0.9\n"
    err = refused(ws, tmp_path, text, capsys=capsys)
    assert f"{tmp_path / 'recipe.yaml'}: key 'density' is given twice (lines 5 and 6)" in err
    assert "which value wins is ambiguous" in err
    mergekit = (
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {base}\n    parameters: {{weight: 0.5, weight: 1.0}}\n"
    )
    err = refused(ws, tmp_path, mergekit, capsys=capsys)
    assert "key 'weight' is given twice (lines 7 and 7)" in err
    merged = tmp_path / "merge_key.yaml"  # a key that overrides a merged mapping (<<) is no duplicate
    merged.write_text(
        f"method: lora_ties\nbase: {base}\nmodels:\n  - &m0 {{model: {a0}, weight: 0.5}}\n"
        f"  - {{<<: *m0, model: {a1}}}\n"
    )
    models = load_recipe(merged).models
    assert [m.model for m in models] == [str(a0), str(a1)] and models[1].params == {"weight": 0.5}


def laughs(levels: int) -> str:
    """The "billion laughs" YAML: `levels` anchors, each a list of nine aliases of the one before."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_yaml_alias_bomb_is_refused_before_it_is_expanded(ws, tmp_path, capsys, levels):
    """9 levels expand to 9⁹ ≈ 3.9·10⁸ strings; 6 levels (5.3·10⁵) already pass the limit."""
    text = (
        laughs(levels)
        + f"method: lora_ties\nbase: {ws[1]}\nmodels: [{ws[2][0]}]\nparameters: {{x: *l{levels - 1}}}\n"
    )
    err = refused(ws, tmp_path, text, capsys=capsys)
    assert f"{tmp_path / 'recipe.yaml'}: YAML expands through its aliases to more than 100000 nodes" in err


def test_binary_garbage_as_recipe_or_config_is_named(ws, tmp_path, capsys):
    garbage = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    err = refused(ws, tmp_path, garbage, capsys=capsys)
    assert f"{tmp_path / 'recipe.yaml'}: not a text file (byte 0 is not UTF-8: binary data?)" in err
    bad = damaged(ws[2][1], tmp_path / "bad")
    (bad / "adapter_config.json").write_bytes(garbage)
    err = refused(ws, tmp_path, adapter_recipe(ws, bad), capsys=capsys)
    assert f"{bad / 'adapter_config.json'}: not a text file" in err
    err = refused(ws, tmp_path, "method: ties\x00\nbase: b\n", capsys=capsys)
    assert "invalid YAML (special characters are not allowed)" in err
    err = refused(ws, tmp_path, "#" * (16 << 20) + "\nmethod: ties\n", capsys=capsys)
    assert f"{tmp_path / 'recipe.yaml'}: 16.0 MiB, more than the 16 MiB read from a file of this kind" in err


@pytest.mark.parametrize(
    "content, problem",
    [
        (DEEP.encode(), "JSON nested deeper than 100 levels"),
        (b"\xff\xfe\x00{}", "not a text file (byte 0 is not UTF-8"),
    ],
)
def test_routing_file_and_continued_adapter_config_are_read_within_limits(ws, tmp_path, content, problem):
    """The routed model's cpm_routing.json and the adapter config `finetune --init-adapter` continues."""
    from forgetless.cpm import ROUTING_FILE, read_routing
    from forgetless.errors import ForgetlessError
    from forgetless.train.targets import LoraSpec, read_init_adapter

    routed = tmp_path / "routed"
    routed.mkdir()
    (routed / ROUTING_FILE).write_bytes(content)
    with pytest.raises(ForgetlessError, match=r"^\S*cpm_routing\.json: " + problem.replace("(", r"\(")):
        read_routing(routed)
    bad = damaged(ws[2][1], tmp_path / "bad")
    (bad / "adapter_config.json").write_bytes(content)
    with pytest.raises(ForgetlessError, match=r"^\S*adapter_config\.json: " + problem.replace("(", r"\(")):
        read_init_adapter(bad, LoraSpec(r=4, alpha=8))


# ---------------------------------------------------------------------------------------------- every JSON read
def _deep_header(path: Path) -> None:
    raw = (b'{"a":' * 2000 + b"1" + b"}" * 2000).ljust(8 * 1250)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)


def _deep_index(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")


DEEP_FILES = [  # (what, damage(model folder, data file), command, words)
    (
        "config.json",
        lambda m, d: (m / "config.json").write_text(DEEP),
        "stats",
        "config.json: JSON nested deeper",
    ),
    (
        "a shard's header",
        lambda m, d: _deep_header(m / "model.safetensors"),
        "stats",
        "model.safetensors: JSON nested deeper",
    ),
    ("the index", lambda m, d: _deep_index(m), "merge", "model.safetensors.index.json: JSON nested deeper"),
    ("a JSON data file", lambda m, d: d.write_text(DEEP), "stats", "JSON nested too deep to read"),
    (
        "a JSONL data line",
        lambda m, d: d.write_text('{"question": "q", "answer": "a"}\n' + DEEP + "\n"),
        "stats",
        "line 2: invalid JSON (nested too deep)",
    ),
    (
        "a result file",
        lambda m, d: (d.parent / "base.json").write_text(DEEP),
        "eval --base",
        "base.json: JSON nested",
    ),
    ("a task.json", lambda m, d: (d.parent / "task.json").write_text(DEEP), "eval", "task.json: JSON nested"),
]


@pytest.mark.parametrize(
    "damage, command, words", [c[1:] for c in DEEP_FILES], ids=[c[0] for c in DEEP_FILES]
)
def test_every_json_the_tool_reads_is_refused_by_depth_not_a_recursion_error(
    ws, tmp_path, capsys, damage, command, words
):
    model, data = tmp_path / "model", tmp_path / "task" / "test.jsonl"
    shutil.copytree(ws[1], model)
    data.parent.mkdir()
    data.write_text('{"question": "q", "answer": "a"}\n')
    (data.parent / "base.json").write_text("{}")
    damage(model, data)
    argv = {
        "stats": ["stats", "gram", str(model), "--data", str(data), "--out", str(tmp_path / "g.safetensors")],
        "eval": ["eval", str(model), "--tasks", str(data.parent)],
        "eval --base": [
            "eval",
            str(model),
            "--tasks",
            str(data.parent),
            "--base",
            str(data.parent / "base.json"),
        ],
        "merge": ["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")],
    }[command]
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({"method": "linear", "base": str(ws[1]), "models": [str(model)]})
    )
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and words in err and "bug" not in err, err
