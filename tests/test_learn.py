"""`forgetless learn` (coefficients per group learned on data) and `forgetless soup` (the greedy soup), on a tiny
Llama with the SmolLM2 tokenizer. The fine-tune is one gradient step on the task's answer loss from the base, so
along the segment from the base to it the task loss falls: a known optimum (λ = 1) for the labels objective."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import build_llama_with_tokenizer, save_statistics_for
from safetensors.torch import load_file

from forgetless.checkpoint import layout as layouts
from forgetless.cli import cli
from forgetless.errors import ForgetlessError
from forgetless.eval.learn import Learner, LearnOptions, fit, learn, write_learned
from forgetless.eval.soup import greedy, greedy_soup, order_key
from forgetless.eval.sweep import Rule

OPTS = ["red", "green", "blue", "yellow"]


def _task(folder, name, kind, rows):
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "kind": kind}))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _colours(answers=None):
    return [
        {"id": str(i), "question": f"Colour {i}?", "answer": (answers or OPTS)[i % 4], "options": OPTS}
        for i in range(8)
    ]


def _facts(answer="yes", said=None):
    mc = [
        {"id": str(i), "question": f"Fact {i}?", "answer": answer, "options": ["yes", "no"]} for i in range(3)
    ]
    return mc + [{"id": f"o{i}", "question": f"Say {i}.", "answer": said or f"word {i}"} for i in range(3)]


def _one_step(base, task, out):
    """θ₀ − η∇L(θ₀): the base moved one small gradient step down the task's mean answer loss."""
    from transformers import AutoModelForCausalLM

    from forgetless.stats.data import Encoder, collate, load_samples
    from forgetless.train.loop import answer_losses

    model = AutoModelForCausalLM.from_pretrained(base)
    enc = Encoder(base)
    batch = collate([enc(s) for s in load_samples(task / "val.jsonl", shuffle=False)], enc.pad_token_id)
    batch.pop("sample_index")
    loss = answer_losses(model, batch).mean()
    loss.backward()
    norm2 = sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.2 * float(loss) / norm2 * p.grad
    model.save_pretrained(out)
    enc.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    base = build_llama_with_tokenizer(root / "base", seed=0)
    t = _task(root / "tasks" / "colours", "colours", "downstream", _colours())
    g = _task(root / "tasks" / "facts", "facts", "general_text", _facts())
    ft = _one_step(base, t, root / "ft")
    wise = root / "wise.yaml"
    wise.write_text(f"method: linear\nbase: {base}\nmodels: [{ft}]\n")
    return base, ft, t, g, wise


def _cgm_recipe(root, base, ft):
    """A CGM recipe over positive random Fishers of every tensor."""
    sd = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for kind in ("task", "general"):
        fisher = {n: torch.rand(v.shape, generator=gen) + 0.1 for n, v in sd.items()}
        save_statistics_for(base, root / f"f_{kind}.safetensors", fisher)
    recipe = root / "cgm.yaml"
    recipe.write_text(
        f"method: cgm\nbase: {base}\nmodels: [{ft}]\nparameters: {{alpha: 0.5}}\n"
        f"statistics: {{fisher_task: {root / 'f_task.safetensors'}, fisher_general: {root / 'f_general.safetensors'}}}\n"
    )
    return recipe


def _deltas(base, ft):
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    return {n: (f[n].double() - b[n].double()) for n in b}


def _all(learner):
    return list(range(len(learner.objective.task))), list(range(len(learner.objective.general)))


@pytest.mark.parametrize("method,objective", [("linear", "labels"), ("linear", "entropy"), ("cgm", "labels")])
def test_the_gradient_is_the_finite_difference_and_the_inner_products(setup, tmp_path, method, objective):
    """∂L/∂c_g by autograd through the coefficients = the central difference of L (float64 weights) = Σ_t ⟨∂L/∂θ_t, ∂θ_t/∂c_g⟩
    from a separate backward pass through a plain model holding the merged weights (linear: ∂θ_t/∂λ_g = Δ_t;
    CGM, c = log α: −α·F_task·F_gen/(F_task + α·F_gen)²·Δ_t)."""
    from transformers import AutoModelForCausalLM

    base, ft, t, g, wise = setup
    recipe = wise if method == "linear" else _cgm_recipe(tmp_path, base, ft)
    opts = LearnOptions(objective=objective, dtype="float64", device="cpu", batch_size=64)
    learner = Learner(recipe, str(t), str(g), opts)
    ti, gi = _all(learner)
    n = len(learner.groups)
    assert [gr.scope for gr in learner.groups] == ["language.embed", "language.layers", "language.norm"]
    raw = torch.linspace(0.2, 0.8, n, dtype=torch.float64)
    raw = (raw if method == "linear" else raw.log()).requires_grad_(True)
    value = learner.value(raw, ti, gi)
    (grad,) = torch.autograd.grad(value, raw)
    h = 1e-2  # the answer loss is computed in float32 (answer_losses): its rounding, not h², limits the difference
    for k in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[k] = h
        with torch.no_grad():
            fd = (learner.value(raw + e, ti, gi) - learner.value(raw - e, ti, gi)) / (2 * h)
        rounding = 4 * torch.finfo(torch.float32).eps * abs(float(value.detach())) / h
        assert float(fd) == pytest.approx(float(grad[k]), rel=2e-3, abs=rounding)

    plain = AutoModelForCausalLM.from_pretrained(base).double()
    named = dict(plain.named_parameters())
    with torch.no_grad():
        for pname, w in learner.merged.weights(raw.detach()).items():
            named[pname].copy_(w)
    again = learner.objective.value(plain, ti, gi)
    assert float(again.detach()) == pytest.approx(float(value.detach()), rel=1e-12)
    again.backward()
    delta = _deltas(base, ft)
    alpha = raw.detach().exp()
    stats = (
        {k: load_file(str(tmp_path / f"f_{k}.safetensors")) for k in ("task", "general")}
        if method == "cgm"
        else {}
    )
    for k, group in enumerate(learner.groups):
        total = 0.0
        for tensor in learner.merged.tensors:
            if tensor.group != k:
                continue
            d = delta[tensor.name]
            if method == "cgm":
                f_t, f_g = stats["task"][tensor.name].double(), stats["general"][tensor.name].double()
                d = -alpha[k] * f_t * f_g / (f_t + alpha[k] * f_g) ** 2 * d
            total += float((named[tensor.param].grad * d).sum())
        assert total == pytest.approx(float(grad[k]), rel=1e-6, abs=1e-9), group.scope


def _brute_force(base, ft, entries, method="linear"):
    """θ₀ + c_g·Δ per tensor, c_g the first entry of the learned list whose scope selects the tensor."""
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    lay = layouts.detect_layout(json.loads((base / "config.json").read_text()), list(b))
    chosen = [
        (None if "scope" not in e else layouts.select(lay, list(b), [e["scope"]]), e["value"])
        for e in entries
    ]
    return {n: b[n] + next(v for sel, v in chosen if sel is None or n in sel) * (f[n] - b[n]) for n in b}


def test_the_merged_weights_at_the_learned_coefficients_are_the_brute_force_ones(setup, tmp_path):
    base, ft, t, g, wise = setup
    learner = Learner(wise, str(t), str(g), LearnOptions(by="layer", steps=6, lr=0.1, device="cpu"))
    history = fit(learner, log=None)
    write_learned(learner, tmp_path / "l.yaml", {"history": history})
    entries = yaml.safe_load((tmp_path / "l.yaml").read_text())["parameters"]["lambda"]
    assert [e.get("scope") for e in entries] == [
        "language.embed",
        "language.layers[0]",
        "language.layers[1]",
        "language.layers[2]",
        "language.norm",
        None,
    ]
    assert [e["value"] for e in entries[:-1]] == learner.final and entries[-1] == {"value": 0.5}
    expected = _brute_force(base, ft, entries)
    got = learner.merged.by_checkpoint_name(learner.final)
    assert set(got) == {n for n, d in _deltas(base, ft).items() if d.abs().max() > 0}
    for n, w in got.items():
        torch.testing.assert_close(w, expected[n], rtol=0, atol=2e-7)


def test_labels_with_no_general_weight_move_lambda_to_the_fine_tune(setup):
    """The fine-tune is a small step down the task loss, so each group's derivative is negative on [0, 1]: every λ
    reaches the clamp at 1 and the objective falls."""
    _, _, t, _, wise = setup
    learner = Learner(wise, str(t), None, LearnOptions(general_weight=0, steps=30, lr=0.1, device="cpu"))
    history = fit(learner, log=None)
    assert learner.final == [1.0, 1.0, 1.0]
    assert history[-1]["objective"] < history[0]["objective"]
    assert all(h["max"] <= 1.0 and h["min"] >= 0.0 for h in history)


def test_the_entropy_objective_reads_no_answer(setup, tmp_path):
    """The same questions and options with other answers (another option, or garbage) give bit-identical
    coefficients and objectives; the labels objective does see them."""
    _, _, t, g, wise = setup
    t2 = _task(tmp_path / "colours", "colours", "downstream", _colours(answers=OPTS[::-1]))
    g2 = _task(tmp_path / "facts", "facts", "general_text", _facts(answer="no", said="zzz garbage"))
    runs = {}
    for mode in ("entropy", "labels"):
        for name, (tt, gg) in {"given": (t, g), "other": (t2, g2)}.items():
            opts = LearnOptions(objective=mode, steps=4, lr=0.1, batch_size=3, device="cpu")
            rec = learn(
                wise,
                task=str(tt),
                general=str(gg),
                out=tmp_path / f"{mode}-{name}.yaml",
                options=opts,
                log=None,
            )
            runs[mode, name] = (
                [gr["value"] for gr in rec["groups"]],
                [h["objective"] for h in rec["history"]],
            )
    assert runs["entropy", "given"] == runs["entropy", "other"]
    assert runs["labels", "given"] != runs["labels", "other"]


def test_refusals_before_any_work(setup, tmp_path):
    base, ft, t, g, wise = setup
    ties = tmp_path / "ties.yaml"
    ties.write_text(f"method: ties\nbase: {base}\nmodels: [{ft}]\n")
    with pytest.raises(ForgetlessError, match="linear, task_arithmetic or cgm") as e:
        Learner(ties, str(t), str(g))
    assert e.value.file is not None and e.value.remedy
    with pytest.raises(ForgetlessError, match="unknown group kind 'tensor'"):
        Learner(wise, str(t), str(g), LearnOptions(by="tensor"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ForgetlessError, match="no samples"):
        Learner(wise, str(empty), str(g))
    with pytest.raises(ForgetlessError, match="no general data"):
        Learner(wise, str(t), None)


def test_merge_of_the_learned_recipe_gives_the_learners_weights(setup, tmp_path):
    """The round trip: `forgetless learn` writes the recipe, `forgetless merge` of it gives the learner's merged
    weights (the per-part list of `parameters.lambda` read by the merge)."""
    base, ft, t, g, wise = setup
    out = tmp_path / "learned.yaml"
    args = ["learn", str(wise), "--task", str(t), "--general", str(g), "--by", "layer", "--steps", "3"]
    res = CliRunner().invoke(
        cli, [*args, "--lr", "0.2", "--out", str(out), "--device", "cpu", "--held-out", "val"]
    )
    assert res.exit_code == 0, res.output
    assert "step 3/3" in res.output and out.is_file() and "(held out)" in res.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["held_out"]["split"] == "val" and "E" in record["held_out"]
    assert [h["step"] for h in record["history"]] == [1, 2, 3] and record["data"]["colours"]["role"] == "task"
    entries = yaml.safe_load(out.read_text())["parameters"]["lambda"]
    changed = [
        gr for gr in record["groups"] if gr["changed"]
    ]  # a group the fine-tune left as θ₀ has no entry
    assert [e["value"] for e in entries[:-1]] == [gr["value"] for gr in changed]
    assert [e["scope"] for e in entries[:-1]] == [gr["scope"] for gr in changed]
    res = CliRunner().invoke(cli, ["merge", str(out), "--out", str(tmp_path / "merged"), "--quiet"])
    assert res.exit_code == 0, res.output or res.exception
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for n, w in _brute_force(base, ft, entries).items():
        torch.testing.assert_close(merged[n], w, rtol=0, atol=2e-7)


def test_greedy_soup_is_the_brute_force_loop_over_the_same_scores():
    scores = {
        ("a",): {"T": 50.0, "G": 10.0},
        ("b",): {"T": 70.0, "G": 10.0},
        ("c",): {"T": 60.0, "G": 10.0},
        ("d",): {"T": 60.0, "G": 20.0},
        ("b", "d"): {"T": 71.0, "G": 5.0},
        ("b", "d", "c"): {"T": 69.0, "G": 50.0},
        ("b", "d", "a"): {"T": 71.0, "G": 6.0},
    }
    res = greedy(["a", "b", "c", "d"], lambda fs: scores[tuple(fs)])
    soup, current = ["b"], scores["b",]
    for f in ["d", "c", "a"]:  # by T, then G; ties in the given order
        s = scores[(*soup, f)]
        if (s["T"], s["G"]) >= (current["T"], current["G"]):
            soup, current = [*soup, f], s
    assert res["soup"] == soup == ["b", "d", "a"] and res["ranked"] == ["b", "d", "c", "a"]
    assert [s["kept"] for s in res["steps"]] == [True, True, False, True]
    # with a rule: the points that meet it first (max_loss 0: F ≥ 0), then the best E
    pts = {k: {**v, "E": v["T"] - 50, "F": v["G"] - 10} for k, v in scores.items()}
    key = order_key(Rule(max_loss=0), None)
    assert key(pts["b",]) > key(pts["b", "d"])  # b, d loses general score: it does not meet the target
    pts["b", "c"] = {"T": 75.0, "G": 10.0, "E": 25.0, "F": 0.0}  # meets it, better E: kept
    pts["b", "c", "a"] = {"T": 60.0, "G": 10.0, "E": 10.0, "F": 0.0}  # meets it, worse E: left out
    ruled = greedy(["a", "b", "c", "d"], lambda fs: pts[tuple(fs)], Rule(max_loss=0))
    assert ruled["soup"] == ["b", "c"] and ruled["ranked"] == ["b", "d", "c", "a"]
    assert [s["kept"] for s in ruled["steps"]] == [True, False, True, False]


def test_greedy_soup_on_tiny_models(setup, tmp_path):
    """Three fine-tunes: the real scores are the harness's; the recipe is the chosen ingredients' uniform average,
    and its recorded score is the evaluation of that merge."""
    import forgetless
    from forgetless.eval.harness import evaluate

    base, ft, t, g, _ = setup
    ft2 = _one_step(ft, t, tmp_path / "ft2")
    other = build_llama_with_tokenizer(tmp_path / "other", seed=3)
    out = tmp_path / "soup.yaml"
    args = ["soup", str(base), str(ft), str(ft2), str(other), "--task", str(t), "--general", str(g)]
    res = CliRunner().invoke(
        cli, [*args, "--out", str(out), "--workdir", str(tmp_path / "w"), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    record = json.loads(out.with_suffix(".json").read_text())
    recipe = yaml.safe_load(out.read_text())
    assert (
        recipe["method"] == "linear"
        and recipe["models"] == record["soup"]
        and recipe["parameters"] == {"lambda": 1.0}
    )
    singles = record["singles"]
    assert record["ranked"] == sorted(singles, key=lambda f: (singles[f]["T"], singles[f]["G"]), reverse=True)
    forgetless.merge(recipe, out=tmp_path / "soup", progress=False, log=None)
    direct = evaluate(
        tmp_path / "soup", {"colours": t}, general={"facts": g}, split="val", log=None, progress=False
    )
    assert record["score"]["T"] == pytest.approx(100 * direct["tasks"]["colours"]["accuracy"])
    with pytest.raises(ForgetlessError, match="at least two"):
        greedy_soup(base, [ft], task={"colours": t}, out=tmp_path / "x.yaml")


def test_a_group_the_fine_tune_left_unchanged_gets_no_entry(setup, tmp_path):
    """A fine-tune of layer 1 only: learned per layer, the recipe has an entry for layer 1 alone (every other
    tensor is θ₀ at any λ and takes the default), and merging it gives the learner's weights."""
    import shutil

    from safetensors.torch import save_file

    base, ft, t, g, _ = setup
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    part = tmp_path / "ft-layer1"
    shutil.copytree(base, part)
    save_file({n: f[n] if ".layers.1." in n else b[n] for n in b}, str(part / "model.safetensors"))
    recipe = tmp_path / "wise.yaml"
    recipe.write_text(f"method: linear\nbase: {base}\nmodels: [{part}]\n")
    out = tmp_path / "learned.yaml"
    learn(recipe, task=str(t), general=str(g), out=out, by="layer", steps=2, lr=0.2, device="cpu", log=None)
    entries = yaml.safe_load(out.read_text())["parameters"]["lambda"]
    assert [e.get("scope") for e in entries] == ["language.layers[1]", None]
    groups = json.loads(out.with_suffix(".json").read_text())["groups"]
    assert [gr["scope"] for gr in groups if gr["changed"]] == ["language.layers[1]"]
    res = CliRunner().invoke(cli, ["merge", str(out), "--out", str(tmp_path / "merged"), "--quiet"])
    assert res.exit_code == 0, res.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for n, w in _brute_force(base, part, entries).items():
        torch.testing.assert_close(merged[n], w, rtol=0, atol=2e-7)


def test_an_output_that_is_an_input_is_refused_before_any_work(setup, tmp_path):
    """`--out` naming the input recipe or the task's data, or a soup written into an ingredient, is refused; the
    inputs stay."""
    base, ft, t, g, wise = setup
    before = wise.read_bytes()
    with pytest.raises(ForgetlessError, match="an input"):
        learn(wise, task=str(t), general=str(g), out=wise, steps=1, device="cpu", log=None)
    assert wise.read_bytes() == before
    data = t / "val.jsonl"
    kept = data.read_bytes()
    with pytest.raises(ForgetlessError, match="an input"):
        learn(wise, task=str(t), general=str(g), out=data, steps=1, device="cpu", log=None)
    assert data.read_bytes() == kept
    with pytest.raises(ForgetlessError, match="an input"):
        greedy_soup(
            base, [ft, ft], task={"colours": str(t)}, out=ft / "soup.yaml", scorer=lambda _f: {}, log=None
        )


def test_options_scored_from_one_prompt_give_the_whole_sequences_objective_and_gradient(setup, monkeypatch):
    """Entropy on multiple choice: each prompt run once and its keys and values reused by every option (the
    harness's fast path) gives the log-distributions, the objective and its gradient of running each (question,
    option) sequence whole, to float32 rounding."""
    from forgetless.eval import harness
    from forgetless.eval import learn as L

    *_, t, g, wise = setup
    learner = Learner(wise, str(t), str(g), LearnOptions(objective="entropy", device="cpu", batch_size=64))
    ti, gi = _all(learner)
    items = learner.objective.task + learner.objective.general
    assert sum(it.options is not None for it in items) == 8 + 3  # the colours and the yes/no facts

    def run() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        raw = torch.linspace(0.2, 0.8, len(learner.groups)).requires_grad_(True)
        value = learner.value(raw, ti, gi)
        with torch.no_grad():
            dists = L.predictions(learner.model, items, learner.objective.pad, "cpu")
        return dists, value.detach(), torch.autograd.grad(value, raw)[0]

    calls = []
    sums = harness.option_sums
    monkeypatch.setattr(harness, "option_sums", lambda *a: calls.append(1) or sums(*a))
    fast = run()
    assert calls  # the fast path ran
    monkeypatch.setattr(harness, "_fast_parts", lambda model: None)
    whole = run()
    assert len(calls) == 3  # and not again
    for a, b in zip(fast[0], whole[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[2], whole[2], rtol=1e-4, atol=1e-6)
