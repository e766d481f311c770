"""MagMax and OPCM (forgetless.methods.continual_merge) and their step-by-step command (forgetless.chains.
continual_merge): the rules against FusionBench's steps written out independently (full SVDs, the λₜ bookkeeping of
its opcm.py, its `>=` fold for MagMax), k `continual merge` steps against the rule on the k models at once (bit for
bit) and against `forgetless merge` with method magmax, a killed step leaving the old state or the new one, and
every bad input refused before any work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import crash_worker
import pytest
import torch
from conftest import build_tiny_llama
from crash_worker import digest
from safetensors.torch import load_file, save_file

import forgetless
from forgetless.chains import continual_merge as chain
from forgetless.chains.continual_merge import load_merge_state, merge_step, show_merge_state
from forgetless.cli import main
from forgetless.errors import ForgetlessError
from forgetless.methods import METHODS
from forgetless.methods import continual_merge as R

HERE = Path(__file__).parent
STEPS = 3


def _save(tensors: dict[str, torch.Tensor], folder: Path, config_from: Path) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(config_from / "config.json", folder / "config.json")
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def chain_dirs(tmp_path_factory):
    """A tiny Llama base and three models fine-tuned in sequence (each from the previous: its noise added to it)."""
    root = tmp_path_factory.mktemp("seq")
    base = build_tiny_llama(root / "base")
    g = torch.Generator().manual_seed(0)
    current, models = _tensors(base), []
    for t in range(STEPS):
        current = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in current.items()}
        models.append(_save(current, root / f"ft{t}", base))
    return base, models


def _step(state: Path, model: Path, out: Path | None, **kw) -> forgetless.chains.continual.ContinualReport:
    return merge_step(state, model=model, out=out, log=None, device="cpu", **kw)


def _run(method: str, base: Path, models: list[Path], state: Path, outs: Path, **kw) -> list[Path]:
    done = []
    for t, m in enumerate(models):
        first = {"method": method, "base": base} if t == 0 else {}
        done.append(outs / f"after-{t}")
        _step(state, m, done[-1], **first, **kw)
    return done


# ---------------------------------------------------------------------------------------------- the rules
def _fusionbench_magmax(theta0: torch.Tensor, thetas: list[torch.Tensor], lam: float) -> torch.Tensor:
    """FusionBench's magmax.py, written out: the task vectors folded with `>=`, then θ₀ + λ·τ_max."""
    taus = [t - theta0 for t in thetas]
    merged = taus[0].clone()
    for tau in taus[1:]:
        merged = torch.where(tau.abs() >= merged.abs(), tau, merged)
    return theta0 + lam * merged


def _fusionbench_clean(previous: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """FusionBench's merge_linear_weights, written out: full SVD, UᵀτV with its diagonal and its top-left
    split_rank block zeroed, back through U and Vᵀ."""
    u, s, vh = torch.linalg.svd(previous, full_matrices=True)
    split = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax().item())
    projected = u.T @ tau @ vh.T
    projected.diagonal().fill_(0)
    projected[:split, :split] = 0
    return u @ projected @ vh


def _fusionbench_opcm(theta0: dict, thetas: list[dict], alpha: float, linear) -> dict:
    """FusionBench's OPCMForCLIP.run, written out on state dicts: the merged model starts as θ₁; each next model is
    projected (Linear weights) or added (the rest) with λₜ₋₁, then the merged task vector is rescaled to the
    running mean of the task-vector norms, λₜ = ‖merged − θ₀‖ / mean."""

    def norm(sd: dict) -> float:
        return float(torch.cat([(sd[k] - theta0[k]).reshape(-1) for k in theta0]).norm())

    merged = {k: v.clone() for k, v in thetas[0].items()}
    norms, previous_lambda = [norm(thetas[0])], 1.0
    for theta in thetas[1:]:
        norms.append(norm(theta))
        avg = sum(norms) / len(norms)
        for k, t0 in theta0.items():
            prev, tau = merged[k] - t0, theta[k] - t0
            cleaned = _fusionbench_clean(prev, tau, alpha) if linear(k, prev.shape) else tau
            merged[k] = t0 + (previous_lambda * prev + cleaned) / 1.0  # λₜ = 1 while the layers merge
        tv_norm = norm(merged)
        previous_lambda = tv_norm / avg
        merged = {k: theta0[k] + (v - theta0[k]) * (avg / tv_norm) for k, v in merged.items()}
    return merged


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_opcm_projection_is_fusionbench_s_on_random_matrices(shape, alpha):
    g = torch.Generator().manual_seed(hash((shape, alpha)) % 2**31)
    previous = torch.randn(shape, generator=g, dtype=torch.float64) * torch.logspace(0, -2, shape[1]).double()
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    want = tau - _fusionbench_clean(previous, tau, alpha)  # the part that is removed
    got = tau - R.opcm_project(previous, tau, alpha)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(tau.abs().max()))
    if alpha > 0:
        assert float(want.norm()) > 0.1 * float(tau.norm())  # the block is not empty: the test sees it
    # float32 inputs are projected in float32, as FusionBench projects a float32 model: both sit about 1e-6·max|τ|
    # from the float64 result (the SVD's rounding), and within that of each other
    got32 = R.opcm_project(previous.float(), tau.float(), alpha)
    theirs32 = _fusionbench_clean(previous.float(), tau.float(), alpha)
    assert got32.dtype == torch.float32
    bound = 1e-5 * float(tau.abs().max())
    assert float((got32 - theirs32).abs().max()) < bound
    assert float((got32.double() - (tau - want)).abs().max()) < bound


def test_split_rank_and_the_projection_remove_what_they_say():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [R.split_rank(s, a) for a in (0.0, 0.39, 0.4, 0.5, 0.95, 1.0)] == [0, 0, 1, 1, 3, 0]
    assert R.split_rank(torch.zeros(3), 0.5) == 0
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    sv = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # shares .38, .67, .86, .95, 1
    previous = u[:, :5] @ torch.diag(sv) @ v.T
    tau = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for alpha, k in ((0.5, 1), (0.8, 2), (0.9, 3)):
        coef = u.T @ R.opcm_project(previous, tau, alpha) @ v  # in the singular bases of Sₜ₋₁
        want = u.T @ tau @ v
        want.diagonal().zero_()  # every uᵢᵀτvᵢ
        want[:k, :k] = 0  # and the block of the top k directions
        assert torch.allclose(coef, want, rtol=0, atol=1e-12), alpha


def test_magmax_rule_is_fusionbench_s_and_later_tasks_win_ties():
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(7, 9, generator=g)
    thetas = [theta0 + torch.randn(7, 9, generator=g) for _ in range(4)]
    assert torch.allclose(R.magmax_rule(theta0, thetas, 0.7), _fusionbench_magmax(theta0, thetas, 0.7))
    tie = R.magmax_select(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, 2.0, 1.0]))
    assert tie.tolist() == [-1.0, 2.0, 3.0]


def test_opcm_rule_is_fusionbench_s_loop(chain_dirs):
    base, models = chain_dirs
    theta0 = {k: v.double() for k, v in _tensors(base).items()}
    thetas = [{k: v.double() for k, v in _tensors(m).items()} for m in models]
    want = _fusionbench_opcm(theta0, thetas, 0.5, R.is_linear)
    got = R.opcm_rule(theta0, thetas, 0.5)
    for k in theta0:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k
    got32 = R.opcm_rule(_tensors(base), [_tensors(m) for m in models], 0.5)  # float32 models
    for k in theta0:
        assert torch.allclose(got32[k].double(), want[k], rtol=0, atol=2e-6), k


def test_which_tensors_are_linear_weights(tiny_llava_dir):
    from forgetless.checkpoint.reader import CheckpointReader

    with CheckpointReader(tiny_llava_dir) as r:
        linear = {n for n in r.names() if R.is_linear(n, r.info(n).shape)}
        two_d = {n for n in r.names() if len(r.info(n).shape) == 2}
    assert {n for n in two_d - linear} == {
        n for n in two_d if "embed_tokens" in n or "position_embedding" in n
    }
    assert any(n.endswith("lm_head.weight") for n in linear)
    assert any("multi_modal_projector.linear_1" in n for n in linear)


# ---------------------------------------------------------------------------------------------- the steps
@pytest.mark.parametrize("method", ["magmax", "opcm"])
def test_k_steps_equal_the_rule_on_the_k_models_bit_for_bit(chain_dirs, tmp_path, method):
    base, models = chain_dirs
    state = tmp_path / "state"
    outs = _run(method, base, models, state, tmp_path)
    theta0 = _tensors(base)
    for t in range(STEPS):
        thetas = [_tensors(m) for m in models[: t + 1]]
        if method == "magmax":
            want = {k: R.magmax_rule(v, [th[k] for th in thetas]) for k, v in theta0.items()}
        else:
            want = R.opcm_rule(theta0, thetas)
        got = _tensors(outs[t])
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (t, k)
    meta = load_merge_state(state)
    assert [t["name"] for t in meta["tasks"]] == ["ft0", "ft1", "ft2"]
    stored = {k for p in meta["parts"] for k in load_file(str(state / p))}
    assert stored == {f"{chain.KEY[method]}/{k}" for k in theta0}  # only what the method needs
    if method == "opcm":
        assert set(meta) >= {"sum_norm"} and all("norm" in t for t in meta["tasks"])
        assert torch.equal(
            _tensors(outs[0])["lm_head.weight"],
            R.apply(
                theta0["lm_head.weight"],
                _tensors(models[0])["lm_head.weight"] - theta0["lm_head.weight"],
                1.0,
            ),
        )


def test_magmax_steps_equal_forgetless_merge_with_method_magmax(chain_dirs, tmp_path):
    base, models = chain_dirs
    outs = _run("magmax", base, models, tmp_path / "state", tmp_path, lambda_=0.8)
    recipe = {
        "method": "magmax",
        "base": str(base),
        "models": [str(m) for m in models],
        "parameters": {"lambda": 0.8},
    }
    forgetless.merge(recipe, out=tmp_path / "batch", progress=False)
    got, want = _tensors(outs[-1]), _tensors(tmp_path / "batch")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (
        str(METHODS["magmax"].ranges["lambda"]) == "(0, inf)"
        and 0.0 not in METHODS["magmax"].ranges["lambda"]
    )


def test_magmax_lambda_may_change_per_step_and_the_state_stays_the_same(chain_dirs, tmp_path):
    base, models = chain_dirs
    _step(tmp_path / "a", models[0], None, method="magmax", base=base)
    _step(tmp_path / "a", models[1], tmp_path / "oa", lambda_=1.0)
    _step(tmp_path / "b", models[0], tmp_path / "ob0", method="magmax", base=base, lambda_=0.3)
    _step(tmp_path / "b", models[1], tmp_path / "ob", lambda_=1.0)
    for p in sorted(p.name for p in (tmp_path / "a").glob("part-*")):
        a, b = load_file(str(tmp_path / "a" / p)), load_file(str(tmp_path / "b" / p))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _tensors(tmp_path / "oa"), _tensors(tmp_path / "ob")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_merge_state(tmp_path / "b")["tasks"][0]["lambda"] == 0.3


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failing_step_leaves_the_previous_state(chain_dirs, tmp_path, monkeypatch):
    base, models = chain_dirs
    state = tmp_path / "state"
    _step(state, models[0], None, method="opcm", base=base)
    before, real, calls = _snapshot(state), chain._fold_part, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # midway: two part files of the new state are written
            raise RuntimeError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(chain, "_fold_part", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        _step(state, models[1], tmp_path / "out")
    assert _snapshot(state) == before and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.lock", "state"]
    monkeypatch.setattr(chain, "_fold_part", real)
    _step(state, models[1], tmp_path / "out")
    assert len(load_merge_state(state)["tasks"]) == 2


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_a_kill_at_any_step_of_the_commit_leaves_the_old_or_the_new_state(chain_dirs, tmp_path, fallback):
    base, models = chain_dirs
    pristine = tmp_path / "pristine"
    _step(pristine, models[0], None, method="opcm", base=base)
    done = tmp_path / "done"
    shutil.copytree(pristine, done)
    _step(done, models[1], None)
    spec = {
        "merge": True,
        "state": str(tmp_path / "state"),
        "pristine": str(pristine),
        "out": str(tmp_path / "out"),
        "fallback": fallback,
        "model": str(models[1]),
        "next_model": str(models[2]),
    }
    result = crash_worker.run(spec, tmp_path)
    kills = result["kills"]
    assert len(kills) >= 6 and result["completed"] == 2
    old, new = digest(pristine), digest(done)
    for (k, after_kill, after_next), stored in zip(kills, result["states"]):
        assert stored == (old if after_kill == 1 else new), k  # the previous state, or the whole new one
        assert after_next == after_kill + 1, k  # and the next step works on it
    assert {a for _, a, _ in kills} == {1, 2}  # kills fell before and after the commit point
    assert not [p for p in tmp_path.iterdir() if ".forgetless-" in p.name]  # the next step cleaned up


def test_sigterm_during_a_step_keeps_the_old_state_and_says_so(chain_dirs, tmp_path):
    base, models = chain_dirs
    state = tmp_path / "state"
    _step(state, models[0], None, method="magmax", base=base)
    before = _snapshot(state)
    code = (
        "import os, signal, sys\nfrom forgetless.chains import continual_merge as c\nfrom forgetless.cli import main\n"
        "real, n = c._fold_part, [0]\n"
        "def step(*a, **kw):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **kw)\n"
        "c._fold_part = step\nmain(sys.argv[1:])\n"
    )
    args = ["continual", "merge", str(state), "--model", str(models[1]), "--out", str(tmp_path / "out")]
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == f"{state}: interrupted; the state is whole, with 1 task(s)"
    assert _snapshot(state) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- refusals
def _refused(match: str, state: Path, fn, monkeypatch) -> ForgetlessError:
    before = _snapshot(state) if state.exists() else None

    def no_work(*a, **kw):
        raise AssertionError("work began")

    monkeypatch.setattr(chain, "_fold_part", no_work)
    with pytest.raises(ForgetlessError, match=match) as e:
        fn()
    monkeypatch.undo()
    assert "\n" not in str(e.value) and e.value.remedy
    assert (_snapshot(state) if state.exists() else None) == before
    return e.value


def test_bad_inputs_are_refused_before_any_work(chain_dirs, tiny_llava_dir, tmp_path, monkeypatch):
    base, models = chain_dirs
    state, out = tmp_path / "state", tmp_path / "out"

    def refused(match, **kw):
        model = kw.pop("model", models[1])
        return _refused(match, state, lambda: _step(state, model, kw.pop("out", out), **kw), monkeypatch)

    refused("needs its method", base=base)
    refused("needs the base model", method="opcm")
    refused("alpha=1.5", method="opcm", base=base, alpha=1.5)
    refused("lambda=0", method="magmax", base=base, lambda_=0.0)
    refused("OPCM takes no λ", method="opcm", base=base, lambda_=1.0)
    refused("another architecture", method="opcm", base=base, model=tiny_llava_dir)
    refused("the base's own weights", method="opcm", base=base, model=base)
    assert not state.exists()
    _step(state, models[0], None, method="opcm", base=base, alpha=0.4)
    refused("already task 1", model=models[0])
    copy = tmp_path / "copy"
    shutil.copytree(models[0], copy)
    refused("already task 1", model=copy)  # the same weights in another folder
    other = build_tiny_llama(tmp_path / "other-base", seed=1)
    refused("another base model", base=other)
    refused("merges with opcm", method="magmax")
    refused("alpha=0.4, this step asks alpha=0.5", alpha=0.5)
    refused("an input", out=state / "x")
    refused("an input", out=models[1])
    (tmp_path / "exists").mkdir()
    refused("already exists", out=tmp_path / "exists")
    lpm = tmp_path / "lpm"
    lpm.mkdir()
    (lpm / "state.json").write_text(json.dumps({"format": "forgetless-continual", "version": 1}))
    _refused("not a forgetless-continual-merge state", lpm, lambda: _step(lpm, models[1], None), monkeypatch)
    mm = tmp_path / "mm"
    _step(mm, models[0], None, method="magmax", base=base)
    _refused("MagMax has none", mm, lambda: _step(mm, models[1], None, alpha=0.5), monkeypatch)


def test_a_damaged_state_is_named(chain_dirs, tmp_path):
    base, models = chain_dirs
    state = tmp_path / "state"
    _step(state, models[0], None, method="opcm", base=base)
    part = min(state.glob("part-*.safetensors"))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(ForgetlessError, match="damaged state: 1 part file"):
        _step(state, models[1], None)
    meta = json.loads((state / "state.json").read_text())
    del meta["sum_norm"]
    (state / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ForgetlessError, match="'sum_norm'"):
        show_merge_state(state)


def test_cli_merge_and_show(chain_dirs, tmp_path, capsys):
    base, models = chain_dirs
    state = tmp_path / "state"
    cmd = ["continual", "merge", str(state), "--device", "cpu"]
    main([*cmd, "--model", str(models[0]), "--method", "opcm", "--base", str(base), "--alpha", "0.3"])
    main([*cmd, "--model", str(models[1]), "--out", str(tmp_path / "o"), "--name", "second"])
    main(["continual", "show", str(state)])
    text = capsys.readouterr().out
    assert "continual opcm state, 2 task(s)" in text and "alpha=0.3" in text and "2. second" in text
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "config.json").is_file()
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--model", str(models[1])])
    assert e.value.code == 2 and "already task 2" in capsys.readouterr().err
