"""The continual LPM state (forgetless.chains.continual): three `add` steps on a tiny LLaVA against the batch LPM computed
independently (PEFT's own merged weights for the deltas, a dense solve for the merge), the rank-r adapter output,
the state's layout, atomic replacement when a step fails, and every bad input refused before any work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import add_args, build_tiny_llava
from peft import LoraConfig
from safetensors.torch import load_file
from test_lora import legacy_to_current, train_adapter
from transformers import LlavaForConditionalGeneration

from forgetless.chains.continual import add_task, load_state, show_state
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.errors import ForgetlessError
from forgetless.stats.store import Statistics, model_fingerprints, save_gram

GAMMA = 1e-2
ALL = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # also the CLIP tower's q/k/v
TARGETS = [ALL, ALL, ["q_proj", "v_proj"]]  # task 3 adapts a subset: ΔW₃ = 0 on the rest


def _input_key(name: str) -> str:
    """Which Linear weights read the same input (the test's own table: q/k/v, and gate/up, of one layer)."""
    return re.sub(
        r"\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$",
        lambda m: "." + ("qkv" if m.group(2) else "gateup"),
        name,
    )


def _write_gram(
    model_dir: Path,
    path: Path,
    seed: int,
    *,
    fps: dict | None = None,
    drop: str | None = None,
    data: str = "data",
) -> dict[str, torch.Tensor]:
    """A Gram file as `forgetless stats gram` writes it (sums and token counts) for every 2-D weight of the base,
    modules with one input sharing one matrix; returns the per-token Grams G = Σxxᵀ / n by name (float64 of what is
    stored). Some Grams are rank-deficient (fewer rows than inputs)."""
    g = torch.Generator().manual_seed(seed)
    sums, counts, per_token, by_input = {}, {}, {}, {}
    with CheckpointReader(model_dir) as r:
        names = [n for n in r.names() if n.endswith(".weight") and len(r.info(n).shape) == 2]
        for n in names:
            key = _input_key(n)
            if key not in by_input:
                width = r.info(n).shape[1]
                rows = int(torch.randint(width // 2, 3 * width, (1,), generator=g))
                X = torch.randn(rows, width, generator=g) * (0.5 + torch.rand(width, generator=g))
                by_input[key] = ((X.T @ X).float(), rows)
            sums[n], counts[n] = by_input[key][0].clone(), by_input[key][1]
            per_token[n] = sums[n].double() / counts[n]
    if drop:
        sums.pop(drop)
    save_gram(path, sums, counts, 4, data_fingerprint=data, **(fps or model_fingerprints(model_dir)))
    return per_token


@pytest.fixture(scope="module")
def tasks(tiny_llava_dir, tmp_path_factory):
    """Three LoRA adapters of the tiny LLaVA, their Gram files, and each adapter's ΔW by base name (from PEFT's
    merge_and_unload minus the base: independent of forgetless's adapter reader)."""
    root = tmp_path_factory.mktemp("continual")
    base_sd = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).state_dict()
    with CheckpointReader(tiny_llava_dir) as r:
        names = r.names()
    out = []
    for i, targets in enumerate(TARGETS):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        merged = train_adapter(
            LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), cfg, root / f"a{i}", seed=i + 1
        )
        deltas = {}
        for n in names:
            d = merged[legacy_to_current(n)].double() - base_sd[legacy_to_current(n)].double()
            if d.abs().max() > 0:
                deltas[n] = d
        grams = _write_gram(tiny_llava_dir, root / f"g{i}.safetensors", seed=10 + i, data=f"data{i}")
        out.append((root / f"a{i}", root / f"g{i}.safetensors", deltas, grams))
    return out


def _batch(tasks, n: str, k: int, approx: str = "full") -> torch.Tensor:
    """Batch LPM of module n after k tasks, by a dense solve: (Σ ΔWᵢGᵢ)(Σ Gᵢ + ρI)⁻¹, ρ = γ·mean diag(Σ Gᵢ)."""
    grams = [t[3][n] for t in tasks[:k]]
    if approx == "diagonal":
        grams = [torch.diag(g.diagonal()) for g in grams]
    deltas = [t[2].get(n, torch.zeros(1, dtype=torch.float64)) for t in tasks[:k]]
    num = sum(d @ g if d.dim() == 2 else torch.zeros(1, dtype=torch.float64) for d, g in zip(deltas, grams))
    H = sum(grams)
    lhs = H + GAMMA * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs, num.T).T


def _add(state, t, out, **kw):
    return add_task(state, adapter=t[0], gram=t[1], out=out, gamma=kw.pop("gamma", GAMMA), log=None, **kw)


def test_three_steps_fold_to_base_plus_batch_lpm(tasks, tiny_llava_dir, tmp_path):
    state = tmp_path / "state"
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    adapted = sorted(tasks[0][2])
    assert len(adapted) == 3 * 6 + 2 * 3  # 3 decoder layers × 6 modules, 2 CLIP layers × q/k/v
    sizes = []
    for k in range(1, 4):
        kw = {"base": tiny_llava_dir} if k == 1 else {}
        report = _add(state, tasks[k - 1], tmp_path / f"out{k}", **kw)
        assert report.step == k and report.output == "model"
        got = load_file(str(tmp_path / f"out{k}" / "model.safetensors"))
        assert got.keys() == base.keys()
        for n in base:
            if n in adapted:
                want = _batch(tasks, n, k)
                d = got[n].double() - base[n].double()
                assert float((d - want).norm() / want.norm()) < 1e-6, (k, n)
            else:
                assert torch.equal(got[n], base[n]), n
        sizes.append(sum(p.stat().st_size for p in state.glob("part-*.safetensors")))
        # the folder is a model transformers loads
        assert (tmp_path / f"out{k}" / "config.json").is_file()
    assert sizes[0] == sizes[1] == sizes[2]  # the state does not grow with t
    # step 3 (a subset adapter) really used ΔW₃ = 0 on k_proj: the merge moved towards the base there
    n = next(n for n in adapted if n.endswith("k_proj.weight"))
    assert float((_batch(tasks, n, 3) - _batch(tasks, n, 2)).norm()) > 1e-3
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "out3")
    meta = load_state(state)
    assert [t["name"] for t in meta["tasks"]] == ["a0", "a1", "a2"]
    assert [t["data_fingerprint"] for t in meta["tasks"]] == ["data0", "data1", "data2"]


def test_state_layout_shared_grams_and_show(tasks, tiny_llava_dir, tmp_path):
    state = tmp_path / "state"
    _add(state, tasks[0], None, base=tiny_llava_dir, state_dtype="float64")
    meta = load_state(state)
    parts = sorted(p.name for p in state.glob("part-*.safetensors"))
    assert len(parts) == len(meta["parts"]) == 5  # one file per decoder layer: 3 language + 2 vision
    keys = sorted(p["key"] for p in meta["parts"].values())
    assert keys == sorted(
        [f"language_model.model.layers.{i}" for i in range(3)]
        + [f"vision_tower.encoder.layers.{i}" for i in range(2)]
    )
    groups = {m["group"] for m in meta["modules"].values()}
    assert len(groups) == 3 * 3 + 2  # per language layer: q/k/v, gate/up, down; per CLIP layer: q/k/v
    for n, m in meta["modules"].items():
        assert _input_key(n) == _input_key(m["group"])
    layer0 = next(f for f, p in meta["parts"].items() if p["key"] == "language_model.model.layers.0")
    t = load_file(str(state / layer0))
    assert sorted(k.split("/")[0] for k in t) == ["delta"] * 6 + ["gram"] * 3 + ["ridge"] * 3
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    group = meta["modules"][q]["group"]
    assert group.endswith(("k_proj.weight", "q_proj.weight", "v_proj.weight")) and group.startswith(q[:30])
    G = tasks[0][3][q]
    assert torch.allclose(t[f"gram/{group}"], G, rtol=1e-12, atol=0)  # H₁ = G₁ (per token), float64 as asked
    assert abs(float(t[f"ridge/{group}"]) - GAMMA * float(G.diagonal().mean())) < 1e-12
    text = show_state(state)
    assert "1 task(s)" in text and "a0" in text and "data0" in text and "11 Gram sums" in text


def test_rank_r_adapter_is_the_truncated_svd(tasks, tiny_llava_dir, tmp_path):
    from peft import PeftModel

    state = tmp_path / "state"
    _add(state, tasks[0], None, base=tiny_llava_dir)
    _add(state, tasks[1], tmp_path / "ad", rank=3)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    meta = load_state(state)
    assert len(sd) == 2 * len(meta["modules"])
    for n, m in meta["modules"].items():
        A = sd[f"base_model.model.{m['module']}.lora_A.weight"].double()
        B = sd[f"base_model.model.{m['module']}.lora_B.weight"].double()
        U, S, Vh = torch.linalg.svd(_batch(tasks, n, 2))
        want = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        assert float((B @ A - want).norm() / want.norm()) < 1e-4, n
    # PEFT loads it onto the base and its merged weights are base + B·A
    peft = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), tmp_path / "ad"
    )
    merged = peft.merge_and_unload().state_dict()
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    n = "language_model.model.layers.1.mlp.down_proj.weight"
    m = meta["modules"][n]["module"]
    want = base[n] + sd[f"base_model.model.{m}.lora_B.weight"] @ sd[f"base_model.model.{m}.lora_A.weight"]
    torch.testing.assert_close(merged[legacy_to_current(n)], want)


def test_diagonal_state_matches_batch_diagonal_lpm(tasks, tiny_llava_dir, tmp_path):
    state = tmp_path / "state"
    _add(state, tasks[0], None, base=tiny_llava_dir, approx="diagonal")
    _add(state, tasks[1], tmp_path / "out")
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in tasks[0][2]:
        want = _batch(tasks, n, 2, approx="diagonal")
        assert float(((got[n].double() - base[n].double()) - want).norm() / want.norm()) < 1e-4, n
        full = _batch(tasks, n, 2)
        assert float((want - full).norm() / full.norm()) > 1e-3  # a different merge, not the full one
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    m = load_state(state)["modules"][q]
    assert load_file(str(state / m["part"]))[f"gram/{m['group']}"].shape == (
        32,
    )  # a diagonal: `in` numbers, not in²


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failing_step_leaves_the_previous_state_intact(tasks, tiny_llava_dir, tmp_path, monkeypatch):
    from forgetless.chains import continual

    state = tmp_path / "state"
    _add(state, tasks[0], None, base=tiny_llava_dir)
    before = _snapshot(state)
    real, calls = continual.lpm_update, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 10:  # midway: several part files of the new state are already written
            raise RuntimeError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(continual, "lpm_update", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        _add(state, tasks[1], tmp_path / "out")
    assert len(calls) == 10
    assert _snapshot(state) == before
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.lock", "state"]  # no temporary folder left
    monkeypatch.setattr(continual, "lpm_update", real)
    _add(state, tasks[1], tmp_path / "out")  # the same step succeeds afterwards
    assert len(load_state(state)["tasks"]) == 2


# ---------------------------------------------------------------------------------------------- bad input
def _refused(match: str, state: Path, fn) -> ForgetlessError:
    before = _snapshot(state) if state.exists() else None
    with pytest.raises(ForgetlessError, match=match) as e:
        fn()
    assert "\n" not in str(e.value) and e.value.remedy
    assert (_snapshot(state) if state.exists() else None) == before
    return e.value


def test_bad_inputs_are_refused_before_any_work(tasks, tiny_llava_dir, tmp_path):
    state = tmp_path / "state"
    out = tmp_path / "out"
    _refused("needs the base model", state, lambda: _add(state, tasks[0], out))
    # a Gram file of another model (structure), missing a layer the adapter adapts, or taken at other weights
    other = build_tiny_llava(tmp_path / "other", seed=1)  # same architecture, other weights
    with CheckpointReader(tiny_llava_dir) as r:
        fps = {"model_fingerprint": "0123456789abcdef", "model_weights_fingerprint": r.weights_fingerprint()}
    _write_gram(tiny_llava_dir, tmp_path / "g_arch.safetensors", 1, fps=fps)
    e = _refused(
        "another model",
        state,
        lambda: add_task(
            state,
            adapter=tasks[0][0],
            gram=tmp_path / "g_arch.safetensors",
            out=out,
            base=tiny_llava_dir,
            log=None,
        ),
    )
    assert e.file == str(tmp_path / "g_arch.safetensors") and "stats gram" in e.remedy
    _write_gram(other, tmp_path / "g_other.safetensors", 1)
    _refused(
        "other weights",
        state,
        lambda: add_task(
            state,
            adapter=tasks[0][0],
            gram=tmp_path / "g_other.safetensors",
            out=out,
            base=tiny_llava_dir,
            log=None,
        ),
    )
    dropped = "language_model.model.layers.2.mlp.down_proj.weight"
    _write_gram(tiny_llava_dir, tmp_path / "g_drop.safetensors", 1, drop=dropped)
    e = _refused(
        "no Gram for 1 adapted",
        state,
        lambda: add_task(
            state,
            adapter=tasks[0][0],
            gram=tmp_path / "g_drop.safetensors",
            out=out,
            base=tiny_llava_dir,
            log=None,
        ),
    )
    assert dropped in str(e)
    assert not state.exists() and not out.exists()

    _add(state, tasks[0], tmp_path / "out1", base=tiny_llava_dir)
    e = _refused("already task 1", state, lambda: _add(state, tasks[0], out))
    assert e.file == str(tasks[0][0])
    # the state is from another model: the base given now is not the one it was built on
    _refused("another base model", state, lambda: _add(state, tasks[1], out, base=other))
    # an adapter of another base: a wider tiny LLaVA
    wide = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    cfg = wide.config.to_dict()
    cfg["text_config"]["intermediate_size"] = 48
    from transformers import LlavaConfig

    torch.manual_seed(0)
    wide = LlavaForConditionalGeneration(LlavaConfig.from_dict(cfg))
    train_adapter(wide, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]), tmp_path / "wide_ad")
    e = _refused(
        "implies shape",
        state,
        lambda: add_task(state, adapter=tmp_path / "wide_ad", gram=tasks[1][1], out=out, log=None),
    )
    assert e.file == str(tmp_path / "wide_ad")
    # an adapter that adapts a module the state does not know
    train_adapter(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]),
        tmp_path / "o_ad",
    )
    _refused(
        "does not",
        state,
        lambda: add_task(state, adapter=tmp_path / "o_ad", gram=tasks[1][1], out=out, log=None),
    )
    # options are fixed by the first task; an existing output is not replaced without force
    _refused("created with gamma", state, lambda: _add(state, tasks[1], out, gamma=0.5))
    _refused("already exists", state, lambda: _add(state, tasks[1], tmp_path / "out1"))
    _refused("lies inside an input", state, lambda: _add(state, tasks[1], state / "inside"))
    _refused("rank 40 does not fit", state, lambda: _add(state, tasks[1], out, rank=40))
    # not a state
    (tmp_path / "junk").mkdir()
    _refused("not a continual state", tmp_path / "junk", lambda: _add(tmp_path / "junk", tasks[1], out))
    assert not out.exists() and len(load_state(state)["tasks"]) == 1


def test_cli_add_and_show(tasks, tiny_llava_dir, tmp_path, capsys):
    from forgetless.cli import main

    state = tmp_path / "state"
    main(
        [
            *add_args(state, tasks[0], base=tiny_llava_dir),
            "--out",
            str(tmp_path / "o1"),
            "--gamma",
            str(GAMMA),
            "--name",
            "first",
        ]
    )
    main(
        [
            *add_args(state, tasks[1]),
            "--out",
            str(tmp_path / "o2"),
            "--rank",
            "2",
        ]
    )
    main(["continual", "show", str(state)])
    text = capsys.readouterr().out
    assert "2 task(s)" in text and "1. first" in text and "2. a1" in text
    assert (tmp_path / "o1" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "o2" / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(SystemExit) as e:
        main(
            [
                *add_args(state, tasks[1]),
                "--out",
                str(tmp_path / "o3"),
            ]
        )
    assert e.value.code == 2
    assert "already task 2" in capsys.readouterr().err


def test_data_instead_of_gram_computes_it_at_the_base_and_reuses_it(tmp_path):
    """--data: the Gram is computed at the base over the state's modules (as `stats gram` computes it) and reused
    for the same base, data selection and modules; the merge is the one the explicit Gram file gives."""
    from conftest import build_llama_with_tokenizer, write_qa_jsonl
    from transformers import LlamaForCausalLM

    from forgetless.stats.run import compute_statistics

    base = build_llama_with_tokenizer(tmp_path / "llama", layers=2)
    data = write_qa_jsonl(
        tmp_path / "task.jsonl", [("2 + 3 =", "5"), ("Sky colour?", "Blue"), ("H2O?", "Water")]
    )
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    train_adapter(LlamaForCausalLM.from_pretrained(base), cfg, tmp_path / "ad")
    logs: list[str] = []
    add_task(
        tmp_path / "s1",
        adapter=tmp_path / "ad",
        data=data,
        out=tmp_path / "o1",
        base=base,
        device="cpu",
        log=logs.append,
    )
    computed = sorted((tmp_path / "s1-statistics").glob("gram-*.safetensors"))
    assert len(computed) == 1
    names = sorted(load_state(tmp_path / "s1")["modules"])
    explicit = tmp_path / "explicit.safetensors"
    compute_statistics("gram", base, data, explicit, device="cpu", log=None, progress=False)
    with Statistics(computed[0]) as a, Statistics(explicit) as b:  # q and v read one input: one stored Gram
        assert sorted(a.names()) == names and all(torch.equal(a.get(k), b.get(k)) for k in names)
        assert a.key("model.layers.0.self_attn.v_proj.weight")[1] == "model.layers.0.self_attn.q_proj.weight"
    add_task(
        tmp_path / "s2", adapter=tmp_path / "ad", gram=explicit, out=tmp_path / "o2", base=base, log=None
    )
    x, y = (
        load_file(str(tmp_path / "o1" / "model.safetensors")),
        load_file(str(tmp_path / "o2" / "model.safetensors")),
    )
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(x[n], load_file(str(base / "model.safetensors"))[n]) for n in names)
    # the same data for another state that uses the same stats folder: reused, not recomputed
    mtime = computed[0].stat().st_mtime_ns
    logs.clear()
    add_task(
        tmp_path / "s3",
        adapter=tmp_path / "ad",
        data=data,
        out=None,
        base=base,
        stats_dir=tmp_path / "s1-statistics",
        log=logs.append,
    )
    assert computed[0].stat().st_mtime_ns == mtime and any("reusing" in m for m in logs)
    with pytest.raises(ForgetlessError, match="one of the two"):
        add_task(
            tmp_path / "s4", adapter=tmp_path / "ad", data=data, gram=explicit, out=None, base=base, log=None
        )


def _conditioned_gram(model_dir: Path, path: Path, seed: int, cond: float) -> dict[str, torch.Tensor]:
    """A Gram file whose every matrix has eigenvalues log-spaced over [1, cond] (float32 sums, count 1); returns
    the per-token Grams in float64 as stored."""
    g = torch.Generator().manual_seed(seed)
    sums, stored, by_width = {}, {}, {}
    with CheckpointReader(model_dir) as r:
        for n in [n for n in r.names() if n.endswith(".weight") and len(r.info(n).shape) == 2]:
            key = _input_key(n)
            if key not in by_width:
                w = r.info(n).shape[1]
                Q = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64)).Q
                by_width[key] = (
                    (Q * torch.logspace(0, math.log10(cond), w, dtype=torch.float64)) @ Q.T
                ).float()
            sums[n] = by_width[key].clone()
            stored[n] = sums[n].double()
    save_gram(
        path, sums, dict.fromkeys(sums, 1), 1, data_fingerprint=f"cond{seed}", **model_fingerprints(model_dir)
    )
    return stored


@pytest.mark.parametrize("dtype, bound", [("float64", 2e-7), ("float32", 2e-5)])
def test_the_stored_dtype_bounds_the_agreement_with_the_batch_solve(
    tasks, tiny_llava_dir, tmp_path, dtype, bound
):
    """Three steps through Grams of condition 2e5: the state's ΔW*₃ against the dense batch solve. float64 sums
    keep the recursion exact to rounding; float32 sums (the default, half the size) carry their rounding forward."""
    grams = [_conditioned_gram(tiny_llava_dir, tmp_path / f"c{i}.safetensors", i, 2e5) for i in range(3)]
    state = tmp_path / "state"
    for i, t in enumerate(tasks):
        first = {"base": tiny_llava_dir, "state_dtype": dtype, "gamma": 1e-6} if i == 0 else {}
        add_task(state, adapter=t[0], gram=tmp_path / f"c{i}.safetensors", out=None, log=None, **first)
    meta = load_state(state)
    worst = 0.0
    for n, m in meta["modules"].items():
        got = load_file(str(state / m["part"]))[f"delta/{n}"].double()
        H = sum(g[n] for g in grams)
        num = sum(t[2].get(n, torch.zeros_like(H[:1])) @ g[n] for t, g in zip(tasks, grams))
        want = torch.linalg.solve(
            H + 1e-6 * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype), num.T
        ).T
        worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst < bound, worst
