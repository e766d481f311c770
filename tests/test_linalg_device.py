"""The linear algebra of LPM and RegMean on a device and in a precision (forgetless.methods.linalg): the
device names, the precision each device gets, the refined float32 solve against float64 (an ill-conditioned
matrix of known spectrum, the testbed model's real Gram matrices, a continual step, a RegMean merge), its
fallbacks to float64, the recipe's and the commands' device option, and the FLOP floor of an LPM step. No GPU
is needed: the refined path runs on the CPU with ``precision="float32"``; the CUDA tests compare a GPU's
results with the CPU's where there is one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, linear_weight_shapes, save_statistics_for, write_qa_jsonl
from safetensors.torch import load_file, save_file
from test_adapter_merge import _merge, adapters  # noqa: F401  (adapters: the fixture)

import forgetless
from forgetless import engine
from forgetless.chains import continual
from forgetless.cli import main
from forgetless.engine import budget
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS, linalg
from forgetless.methods import adapter as adapter_mod
from forgetless.methods import regmean as regmean_mod
from forgetless.methods.linalg import Cholesky, fp64_capable, resolve_device, solve_dtype
from forgetless.methods.lpm import Solver, lpm_step_flops
from forgetless.methods.regmean import regmean_combine
from forgetless.recipe import load_recipe

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
GOAL = 1e-6  # the refined float32 solve against CPU float64, relative (Frobenius)
LPM_GAMMA = 1e-4  # LPM's default ridge, relative to the mean diagonal: the ill-conditioned systems it solves
LAYER = 20  # the decoder layer of the embedded SmolLM2 whose Grams the tests take
QUESTIONS = [
    [
        ("What is 2 + 3?", "5"),
        ("What colour is the sky on a clear day?", "Blue"),
        ("What is H2O?", "Water"),
        ("Name a primary colour.", "Red"),
        ("How many legs does a spider have?", "Eight"),
    ],
    [
        ("What is the capital of France?", "Paris"),
        ("Which planet is the largest?", "Jupiter"),
        ("What shape has three sides?", "A triangle"),
        ("What is 10 minus 4?", "6"),
        ("Is ice cold?", "Yes"),
    ],
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def log_spaced_spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ, float64: a random orthogonal Q and eigenvalues log-spaced from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    ev = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    a = (q * ev) @ q.T
    return (a + a.T) / 2


def classical_refinement(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """x ← x + solve₃₂(b − x·a), the residual in float64: the textbook refinement, for comparison."""
    factor = torch.linalg.cholesky(a.float())

    def solve32(r):
        return torch.cholesky_solve(r.T.float(), factor).T.double()

    x = solve32(b)
    for _ in range(steps):
        x = x + solve32(b - x @ a)
    return x


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """The embedded SmolLM2 (the testbed's language model) and two Gram files of one of its decoder layers, as
    `forgetless stats gram` computes them on two small question sets; with each file's per-token Grams
    (float64) by stored name."""
    from forgetless.embedded import export_smollm2
    from forgetless.stats.run import compute_statistics

    root = tmp_path_factory.mktemp("testbed_grams")
    base = export_smollm2()
    files, grams = [], []
    for i, pairs in enumerate(QUESTIONS):
        data = write_qa_jsonl(root / f"task{i}.jsonl", pairs)
        path = root / f"gram{i}.safetensors"
        compute_statistics(
            "gram",
            base,
            data,
            path,
            scope=[f"language.layers[{LAYER}:{LAYER + 1}]"],
            device="cpu",
            log=None,
            progress=False,
        )
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            counts = json.loads(f.metadata()["token_counts"])
            grams.append({k: f.get_tensor(k).double() / counts[k] for k in f.keys()})  # noqa: SIM118
        files.append(path)
    return base, files, grams


# ----------------------------------------------------------------------------------------- devices, precision
def test_device_names_resolve_and_a_bad_one_is_named():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert resolve_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "CPU", "", "cuda:-1", 0):
        with pytest.raises(ValueError, match=r"is not a device \(auto, cpu, cuda or cuda:N\)"):
            resolve_device(bad)


@NO_CUDA
def test_a_cuda_device_is_refused_where_there_is_none():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match="CUDA is not available here"):
            resolve_device(name)


def test_float64_where_the_device_does_it_well_else_refined_float32(monkeypatch):
    """Full-rate float64: P100 (6.0), V100 (7.0), A100/A30 (8.0), H100/H200 (9.0), B200 (10.0); the others
    (T4 7.5, RTX 3090/A10 8.6, RTX 4090/L40 8.9, Jetson 8.7, P40 6.1) are refined float32. The CPU is float64;
    ``precision`` forces either."""
    full = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
    for cap in [*full, (7, 5), (8, 6), (8, 7), (8, 9), (6, 1), (12, 0)]:
        assert fp64_capable(cap) == (cap in full), cap
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        want = torch.float64 if cap in full else torch.float32
        assert solve_dtype(torch.device("cuda", 0)) == want, cap
        assert solve_dtype(torch.device("cuda", 0), "float64") == torch.float64
    assert solve_dtype(torch.device("cpu")) == torch.float64
    assert solve_dtype(torch.device("cpu"), "float32") == torch.float32
    with pytest.raises(ValueError, match="precision must be one of auto, float64, float32"):
        solve_dtype(torch.device("cpu"), "half")


# ------------------------------------------------------------------------------------------ the refined solve
def test_cpu_float64_is_a_plain_cholesky_solve_bit_for_bit():
    """The defaults (CPU, float64) give what LPM and RegMean computed before a device existed."""
    a = log_spaced_spd(64, 1e4)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.cholesky_solve(x.T, torch.linalg.cholesky(a + 0.5 * torch.eye(64, dtype=torch.float64))).T
    assert torch.equal(Cholesky(a, shift=0.5).solve(x), want)
    assert torch.equal(Solver(a, 0.5).solve(x), want)


def test_refined_float32_on_an_ill_conditioned_matrix_agrees_with_float64():
    """Condition 1e5, eigenvalues log-spaced, 256 × 256, 64 right-hand sides: the refined float32 solve is
    1.1e-9 from float64's (measured; bound 1e-7), which is itself 3.5e-12 from the exact solution."""
    a = log_spaced_spd(256, 1e5)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = x @ a
    f64 = Cholesky(a).solve(b)
    solver = Cholesky(a, precision="float32")
    refined = solver.solve(b)
    assert solver.dtype == torch.float32 and solver.factor.dtype == torch.float32  # not fallen back
    assert rel(f64, x) < 1e-10
    assert rel(refined, f64) < 1e-7


def test_refined_float32_on_the_testbed_grams_meets_the_goal(testbed):
    """The real Gram matrices of one SmolLM2 decoder layer (about 200 tokens for 576 and 1536 inputs:
    singular, as every real Gram of a short calibration set). LPM's system (the per-token Gram + 1e-4 of its
    mean diagonal, condition 2e6–3e6) for a rank-8 update: refined float32 is 3.7e-10–7.6e-9 from float64
    (measured; goal 1e-6, bound 1e-7), where the textbook refinement with two steps stays 1.4e-4–1.8e-3 away
    (asserted above 1e-5). RegMean's (two tasks' Grams, α = 0.9): 4.7e-9–7.4e-9 (float32 results, to their
    rounding)."""
    _, _, grams = testbed
    g = torch.Generator().manual_seed(3)
    assert len(grams[0]) >= 3 and {t.shape[0] for t in grams[0].values()} == {576, 1536}
    for name, gram in grams[0].items():
        n = gram.shape[0]
        ridge = LPM_GAMMA * float(gram.diagonal().mean())
        delta = (torch.randn(256, 8, generator=g, dtype=torch.float64) * 0.01) @ (
            torch.randn(8, n, generator=g, dtype=torch.float64) * 0.02
        )
        rhs = delta @ gram
        f64 = Solver(gram, ridge).solve(rhs)
        solver = Solver(gram, ridge, precision="float32")
        assert rel(solver.solve(rhs), f64) < min(GOAL, 1e-7), name
        assert solver.chol.dtype == torch.float32, name  # refined, not fallen back to float64
        lhs = gram.clone()
        lhs.diagonal().add_(ridge)
        assert rel(classical_refinement(lhs, rhs, 2), f64) > 1e-5, name  # why the refinement is not textbook
        ws = [torch.randn(256, n, generator=g) * 0.05 for _ in range(2)]
        both = [grams[0][name].float(), grams[1][name].float()]
        want = regmean_combine(ws, [t.clone() for t in both], [1.0, 1.0], 0.9)
        system = regmean_mod.regmean_system([t.clone() for t in both], [1.0, 1.0], 0.9, precision="float32")
        got = regmean_mod.regmean_solve(ws, [t.clone() for t in both], [1.0, 1.0], 0.9, system)
        assert got.dtype == want.dtype == torch.float32 and rel(got, want) < 1e-7, name
        assert system.factor.dtype == torch.float32, name


def test_a_matrix_float32_cannot_factorise_is_solved_in_float64():
    """Condition 1e9: its float32 rounding is not positive definite, so the factorisation is float64."""
    a = log_spaced_spd(256, 1e9)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(a.float())
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solver = Cholesky(a, precision="float32")
    assert solver.ok and solver.dtype == torch.float64
    assert torch.equal(solver.solve(x), Cholesky(a).solve(x))


def test_a_system_the_refinement_does_not_settle_is_solved_in_float64(testbed, monkeypatch):
    """With a single refinement step allowed, LPM's system on a real Gram is not settled (its error estimate
    stays above the tolerance): the solve, and every later one, is float64, bit for bit."""
    _, _, grams = testbed
    gram = next(t for t in grams[0].values() if t.shape[0] == 1536)
    ridge = LPM_GAMMA * float(gram.diagonal().mean())
    x = torch.randn(16, 1536, generator=torch.Generator().manual_seed(5), dtype=torch.float64) @ gram
    monkeypatch.setattr(linalg, "MAX_REFINE", 1)
    solver = Solver(gram, ridge, precision="float32")
    assert solver.chol.dtype == torch.float32
    got = solver.solve(x)
    assert solver.chol.dtype == torch.float64 and solver.chol.a is None
    assert torch.equal(got, Solver(gram, ridge).solve(x))


def test_rows_of_zeros_stay_zero_and_the_others_are_solved():
    a = log_spaced_spd(96, 1e5)
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[[1, 4]] = 0.0
    got = Cholesky(a, precision="float32").solve(x @ a)
    assert bool(torch.isfinite(got).all())
    assert torch.equal(got[[1, 4]], torch.zeros(2, 96, dtype=torch.float64))
    assert rel(got, x) < 1e-7


# --------------------------------------------------------------------------------------- through the commands
def _adapter(base: Path, path: Path, seed: int) -> Path:
    """A rank-4 PEFT adapter of the embedded SmolLM2 on q, v and down of the tests' layer (random factors)."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            o, i = f.get_slice(f"model.layers.{LAYER}.{m}.weight").get_shape()
            key = f"base_model.model.model.layers.{LAYER}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, i, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.01
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "base_model_name_or_path": str(base),
            }
        )
    )
    return path


def _deltas(state: Path) -> dict[str, torch.Tensor]:
    return {
        k: v
        for f in sorted(state.glob("part-*.safetensors"))
        for k, v in load_file(str(f)).items()
        if k.startswith("delta/")
    }


def test_a_continual_step_refined_equals_float64(testbed, tmp_path, monkeypatch):
    """Two `continual add` steps on the testbed model with its real Grams (a float64 state, so that the
    comparison sees the solves): the merged deltas of the refined float32 solves are 2.5e-10–6.5e-9 from
    float64's (measured; bound 1e-7), module by module, after each step."""
    base, files, _ = testbed
    adapters_ = [_adapter(base, tmp_path / f"a{i}", seed=i + 1) for i in range(2)]
    made: list[Solver] = []

    def refined(*args, **kw):
        made.append(Solver(*args, **kw, precision="float32"))
        return made[-1]

    for step, (a, g) in enumerate(zip(adapters_, files), 1):
        continual.add_task(
            tmp_path / "f64",
            adapter=a,
            gram=g,
            out=None,
            base=base,
            state_dtype="float64",
            device="cpu",
            log=None,
        )
        with monkeypatch.context() as m:
            m.setattr(continual, "Solver", refined)
            continual.add_task(
                tmp_path / "f32",
                adapter=a,
                gram=g,
                out=None,
                base=base,
                state_dtype="float64",
                device="cpu",
                log=None,
            )
        want, got = _deltas(tmp_path / "f64"), _deltas(tmp_path / "f32")
        assert len(want) == 3 and want.keys() == got.keys()
        for k in want:
            assert float(want[k].abs().max()) > 0 and rel(got[k], want[k]) < 1e-7, (step, k)
    assert len(made) == 2 * 2 and all(s.chol.dtype == torch.float32 for s in made)  # q/v share one Gram


@pytest.fixture(scope="module")
def regmean_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean_device")
    base = build_tiny_llama(root / "base", seed=0)
    fts = [build_tiny_llama(root / f"ft{i}", seed=i + 1) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        stats = {}
        for k, v in linear_weight_shapes(base).items():
            x = torch.randn(v[1] // 2, v[1], generator=g) * (torch.rand(v[1], generator=g) * 4 + 0.1)
            stats[k] = x.T @ x  # fewer tokens than inputs: singular, as real Grams are
        save_statistics_for(base, root / f"gram{i}.safetensors", stats, kind="gram")
    recipe = {
        "method": "regmean",
        "base": str(base),
        "parameters": {"alpha": 0.9},
        "device": "cpu",
        "models": [
            {"model": str(ft), "statistics": {"gram": str(root / f"gram{i}.safetensors")}}
            for i, ft in enumerate(fts)
        ],
    }
    return recipe, linear_weight_shapes(base)


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row blocks"])
def test_a_regmean_merge_gets_the_recipe_device_and_refined_equals_float64(
    regmean_models, tmp_path, monkeypatch, blocks
):
    """The engine hands the recipe's device to RegMean (whole tensors, and the pre-pass of tensors merged in
    row blocks); the merge with refined float32 solves equals the float64 one to 1e-7 (relative, per tensor;
    measured: the same float32 output, its differences below the output's rounding)."""
    recipe, linear = regmean_models
    memory = "1GiB"
    if blocks:
        monkeypatch.setattr(budget, "RUNTIME_BYTES", 0)
        monkeypatch.setattr(budget, "PREFETCH_BYTES", 512)
        memory = 220_000  # RegMean's Grams come whole with every block
        assert engine.build_plan(recipe, out=tmp_path / "x", memory=memory).block_rows
    forgetless.merge(recipe, out=tmp_path / "f64", progress=False, memory=memory)
    seen = []

    made: list[Cholesky] = []

    def refined(a, **kw):
        seen.append(kw["device"])
        made.append(Cholesky(a, **{**kw, "precision": "float32"}))
        return made[-1]

    monkeypatch.setattr(regmean_mod, "Cholesky", refined)
    forgetless.merge(recipe, out=tmp_path / "f32", progress=False, memory=memory)
    assert seen and set(seen) == {"cpu"} and len(seen) == len(linear)  # one factorisation per Linear weight
    assert all(c.dtype == torch.float32 for c in made)
    want = load_file(str(tmp_path / "f64" / "model.safetensors"))
    got = load_file(str(tmp_path / "f32" / "model.safetensors"))
    for k in linear:
        assert rel(got[k], want[k]) < 1e-7, k


def test_the_adapter_svd_methods_get_the_recipe_device(adapters, tmp_path, monkeypatch):
    """lora_ties and lora_task_arithmetic re-factor on the recipe's device (recorded), the CPU's result."""
    _, base, paths = adapters
    assert all(
        METHODS[m].uses_device
        for m in ("regmean", "lora_ties", "lora_dare_linear", "lora_dare_ties", "lora_task_arithmetic")
    )
    assert not any(METHODS[m].uses_device for m in ("ties", "copa", "lora_cat", "fisher"))
    seen = []

    def recording(device="auto"):
        seen.append(device)
        return resolve_device(device)

    for method, params in (("lora_ties", {"density": 0.5, "rank": 4}), ("lora_task_arithmetic", {"rank": 3})):
        _merge(base, paths, method, tmp_path / method, parameters=params)
        with monkeypatch.context() as m:
            m.setattr(adapter_mod, "resolve_device", recording)
            report = _merge(base, paths, method, tmp_path / f"{method}-cpu", parameters=params, device="cpu")
        assert set(seen) == {"cpu"} and len(seen) == len(report.plan.modules)
        seen.clear()
        want = load_file(str(tmp_path / method / "adapter_model.safetensors"))
        got = load_file(str(tmp_path / f"{method}-cpu" / "adapter_model.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_recipe_device_errors_are_clear(regmean_models, tmp_path, capsys):
    recipe, _ = regmean_models
    with pytest.raises(ForgetlessError, match=r"device: 'gpu' is not a device \(auto, cpu, cuda or cuda:N\)"):
        load_recipe({**recipe, "device": "gpu"})
    with pytest.raises(ForgetlessError, match="device: Input should be a valid string"):
        load_recipe({**recipe, "device": 0})
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    with pytest.raises(SystemExit) as e:
        main(["merge", str(path), "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda:one"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "device: 'cuda:one' is not a device (auto, cpu, cuda or cuda:N)" in err and str(path) in err
    main(["merge", str(path), "--out", str(tmp_path / "o"), "--dry-run", "--device", "cpu"])
    assert "device=cpu" in capsys.readouterr().out  # the plan says where RegMean solves


@NO_CUDA
def test_a_cuda_device_is_refused_before_any_work(regmean_models, testbed, tmp_path):
    recipe, _ = regmean_models
    with pytest.raises(ForgetlessError, match="device: 'cuda': CUDA is not available here") as e:
        forgetless.merge({**recipe, "device": "cuda"}, out=tmp_path / "o", progress=False)
    assert "device: cpu" in e.value.remedy and not (tmp_path / "o").exists()
    base, files, _ = testbed
    a = _adapter(base, tmp_path / "a", seed=1)
    with pytest.raises(ForgetlessError, match="--device: 'cuda:1': CUDA is not available here"):
        continual.add_task(
            tmp_path / "s", adapter=a, gram=files[0], out=None, base=base, device="cuda:1", log=None
        )
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------- the FLOP floor
def test_the_flop_floor_of_an_lpm_step_is_the_hand_count():
    """out = 2, in = 3, r = 1: Cholesky 3³/3 = 9; two triangular solves 2·2·3² = 36; ΔWG from the factors
    2·(1·3² + 2·1·3) = 30; the previous delta times G 2·2·3² = 36."""
    assert lpm_step_flops(2, 3, 1, previous=False) == 9 + 36 + 30
    assert lpm_step_flops(2, 3, 1, previous=True) == 9 + 36 + 30 + 36
    assert lpm_step_flops(2, 3, None, previous=True, factorise=False) == 36 + 36
    # a LLaVA-1.5-7B down_proj (4096 × 11008, rank 16), second task on: 0.445 + 0.993 + 0.005 + 0.993 TFLOP
    flops = lpm_step_flops(4096, 11008, 16, previous=True)
    by_hand = 11008**3 / 3 + 4 * 4096 * 11008**2 + 2 * (16 * 11008**2 + 4096 * 16 * 11008)
    assert flops == pytest.approx(by_hand)
    assert 2.43e12 < flops < 2.44e12


# --------------------------------------------------------------------------------------------------- on a GPU
@CUDA
def test_on_cuda_the_solves_and_the_svds_equal_the_cpus(testbed, tmp_path):
    """Where there is a GPU: LPM's solve on the real Grams (float64 or refined float32, as the GPU does
    best), RegMean, the adapter SVDs and a continual step, each against the CPU (relative 1e-7; the SVD
    factors as their product, 1e-5 in float32)."""
    base, files, grams = testbed
    g = torch.Generator().manual_seed(7)
    for gram in grams[0].values():
        ridge = LPM_GAMMA * float(gram.diagonal().mean())
        rhs = torch.randn(64, gram.shape[0], generator=g, dtype=torch.float64) @ gram
        got = Solver(gram, ridge, device="cuda").solve(rhs)
        assert got.device.type == "cpu" and got.dtype == torch.float64
        assert rel(got, Solver(gram, ridge).solve(rhs)) < 1e-7
        ws = [torch.randn(64, gram.shape[0], generator=g) for _ in range(2)]
        both = [gram.float(), gram.float() * 2]
        got = regmean_combine(ws, [t.clone() for t in both], [1.0, 1.0], 0.9, device="cuda")
        want = regmean_combine(ws, [t.clone() for t in both], [1.0, 1.0], 0.9)
        assert got.device.type == "cpu" and rel(got, want) < 1e-6
    d = torch.randn(300, 200, generator=g)
    for svd in ("exact", "randomized"):
        A, B = adapter_mod.refactor(d, 8, svd, device="cuda")
        A0, B0 = adapter_mod.refactor(d, 8, svd)
        assert A.device.type == "cpu" and rel(B @ A, B0 @ A0) < 1e-5
    a = _adapter(base, tmp_path / "a", seed=1)
    for dev in ("cpu", "cuda"):
        continual.add_task(
            tmp_path / dev,
            adapter=a,
            gram=files[0],
            out=None,
            base=base,
            state_dtype="float64",
            device=dev,
            log=None,
        )
    want, got = _deltas(tmp_path / "cpu"), _deltas(tmp_path / "cuda")
    assert want.keys() == got.keys() and all(rel(got[k], want[k]) < 1e-7 for k in want)
