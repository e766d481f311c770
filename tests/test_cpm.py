"""CPM (MAny's cross-modal projection merging): the routing rule against hand computation, and the continual state
with CPM on a tiny LLaVA — per-task projectors equal PEFT's, prototypes equal the vision tower's features computed
directly, the routed folder's save/load round trip, routing accuracy, and the refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig
from PIL import Image
from test_continual import _write_gram
from test_lora import train_adapter
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

from forgetless.chains.continual import add_task, load_state, show_state
from forgetless.cpm import ROUTING_FILE, RoutedProjector, load_model, read_routing, routing_accuracy
from forgetless.errors import ForgetlessError

LANG = r".*language_model.*\.(q_proj|v_proj)"
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def test_routing_rule_by_hand():
    g = torch.Generator().manual_seed(0)
    projs = [torch.nn.Linear(6, 4) for _ in range(3)]
    protos = torch.randn(3, 6, generator=g)
    feats = torch.randn(2, 5, 6, generator=g)  # 2 images × 5 patches
    with torch.no_grad():
        soft = RoutedProjector(projs, protos, tau=0.1)
        hard = RoutedProjector(projs, protos, tau=0.1, hard=True)
        got, got_hard = soft(feats), hard(feats)
        for i in range(2):
            pooled = [sum(float(feats[i, p, j]) for p in range(5)) / 5 for j in range(6)]
            cos = []
            for t in range(3):
                dot = sum(a * float(b) for a, b in zip(pooled, protos[t]))
                cos.append(dot / math.sqrt(sum(a * a for a in pooled)) / float(protos[t].norm()))
            e = [math.exp(c / 0.1) for c in cos]
            w = [x / sum(e) for x in e]
            want = sum(w[t] * projs[t](feats[i]) for t in range(3))
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
            best = max(range(3), key=cos.__getitem__)
            torch.testing.assert_close(got_hard[i], projs[best](feats[i]))
    assert torch.allclose(soft.route(feats).sum(dim=-1), torch.ones(2))


@pytest.fixture(scope="module")
def cpm_setup(tiny_llava_dir, tmp_path_factory):
    """A tiny LLaVA with an image processor; per colour: 6 images, a data file, an adapter (LoRA on the language
    model's q/v + a full projector via modules_to_save) and a Gram file."""
    root = tmp_path_factory.mktemp("cpm")
    base = root / "base"
    shutil.copytree(tiny_llava_dir, base)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        base
    )
    g = torch.Generator().manual_seed(0)
    tasks = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir()
        recs = []
        for k in range(6):
            noise = torch.randint(-25, 25, (32, 32, 3), generator=g)
            px = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(folder / f"{k}.png")
            recs.append({"image": f"{k}.png", "question": "colour?", "answer": name})
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LANG, modules_to_save=["multi_modal_projector"])
        merged = train_adapter(
            LlavaForConditionalGeneration.from_pretrained(base), cfg, root / f"ad_{name}", seed=i + 1
        )
        _write_gram(base, root / f"g_{name}.safetensors", seed=20 + i)
        proj = {
            k.removeprefix("model.multi_modal_projector."): v
            for k, v in merged.items()
            if k.startswith("model.multi_modal_projector.")
        }
        tasks[name] = {
            "data": folder / "data.jsonl",
            "adapter": root / f"ad_{name}",
            "gram": root / f"g_{name}.safetensors",
            "projector": proj,
        }
    return base, tasks


def _pixels(base, folder):
    proc = CLIPImageProcessor.from_pretrained(base)
    ims = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    return proc(images=ims, return_tensors="pt")["pixel_values"]


def _prototype(model, pv):
    """The mean over images of the patch-mean of the vision tower's layer −2 without CLS (LLaVA's defaults)."""
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
    return hs.double().mean(dim=1).mean(dim=0)


def _add(state, t, out, **kw):
    return add_task(
        state, adapter=t["adapter"], gram=t["gram"], out=out, cpm_data=t["data"], gamma=1e-2, log=None, **kw
    )


def test_continual_with_cpm_writes_a_routed_model(cpm_setup, tmp_path):
    base, tasks = cpm_setup
    state = tmp_path / "state"
    _add(state, tasks["red"], tmp_path / "o1", base=base)
    _add(state, tasks["blue"], tmp_path / "o2")
    assert sorted(p.name for p in state.glob("cpm-task-*")) == [
        "cpm-task-00001.safetensors",
        "cpm-task-00002.safetensors",
    ]
    assert "LPM + CPM" in show_state(state) and "6 images" in show_state(state)
    cfg, projectors, prototypes = read_routing(tmp_path / "o2")
    assert cfg["tasks"] == ["ad_red", "ad_blue"] and cfg["tau"] == 0.1 and cfg["hard"] is False
    plain = LlavaForConditionalGeneration.from_pretrained(base).eval()
    pvs = {name: _pixels(base, t["data"].parent) for name, t in tasks.items()}
    for k, (name, t) in enumerate(tasks.items()):
        assert projectors[k].keys() == t["projector"].keys()
        for key, v in t["projector"].items():
            torch.testing.assert_close(projectors[k][key], v)  # PEFT's modules_to_save copy of this task
        torch.testing.assert_close(prototypes[k].double(), _prototype(plain, pvs[name]), atol=1e-5, rtol=1e-5)
    # the routed model: loads, routes every image to its own task, and its image features are Σ wₜ·Pₜ(f)
    model = load_model(tmp_path / "o2")
    routed = model.model.multi_modal_projector
    assert isinstance(routed, RoutedProjector) and len(routed.projectors) == 2
    assert routing_accuracy(model, pvs) == {"red": 1.0, "blue": 1.0}
    with torch.no_grad():
        f = plain.model.vision_tower(pvs["red"], output_hidden_states=True).hidden_states[-2][:, 1:]
        got = torch.stack(list(model.model.get_image_features(pixel_values=pvs["red"]).pooler_output))
        pooled = torch.nn.functional.normalize(f.mean(dim=1), dim=-1)
        cos = pooled @ torch.nn.functional.normalize(prototypes.float(), dim=-1).T
        w = torch.softmax(cos / 0.1, dim=-1)
        want = 0
        for k, t in enumerate(tasks.values()):
            p = plain.model.multi_modal_projector.__class__(plain.config)
            p.load_state_dict(t["projector"])
            want = want + w[:, k, None, None] * p(f)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a plain folder loads as a plain model; transformers alone loads the routed folder with the base projector
    assert len(load_model(tmp_path / "o1").model.multi_modal_projector.projectors) == 1  # after task 1
    assert not isinstance(load_model(base).model.multi_modal_projector, RoutedProjector)
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "o2")
    assert json.loads((tmp_path / "o2" / ROUTING_FILE).read_text())["format"] == "forgetless-cpm"
    assert [t["cpm_data_fingerprint"] is not None for t in load_state(state)["tasks"]] == [True, True]


def test_cpm_refusals(cpm_setup, tiny_llava_dir, tmp_path):
    base, tasks = cpm_setup
    red, blue = tasks["red"], tasks["blue"]
    with pytest.raises(ForgetlessError, match="not a rank-r adapter"):
        _add(tmp_path / "s0", red, tmp_path / "o", base=base, rank=2)
    # a projector-carrying adapter without CPM: refused, with the hint
    with pytest.raises(ForgetlessError, match="--cpm-data"):
        add_task(tmp_path / "s1", adapter=red["adapter"], gram=red["gram"], out=None, base=base, log=None)
    # a state with CPM needs it on every task (and the other way round)
    _add(tmp_path / "s2", red, None, base=base)
    with pytest.raises(ForgetlessError, match="created with CPM"):
        add_task(tmp_path / "s2", adapter=blue["adapter"], gram=blue["gram"], out=None, log=None)
    with pytest.raises(ForgetlessError, match="routes with tau"):
        _add(tmp_path / "s2", blue, None, tau=0.5)
    # adapters that adapt the vision tower: the prototypes would not hold
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    train_adapter(LlavaForConditionalGeneration.from_pretrained(base), cfg, tmp_path / "vis")
    with pytest.raises(ForgetlessError, match="vision-tower"):
        add_task(
            tmp_path / "s3",
            adapter=tmp_path / "vis",
            gram=red["gram"],
            out=None,
            base=base,
            cpm_data=red["data"],
            log=None,
        )
    # no image processor in the base folder
    with pytest.raises(ForgetlessError, match="no image processor"):
        add_task(
            tmp_path / "s4",
            adapter=red["adapter"],
            gram=red["gram"],
            out=None,
            base=tiny_llava_dir,
            cpm_data=red["data"],
            log=None,
        )
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()


def test_cli_cpm_options(cpm_setup, tmp_path):
    from forgetless.cli import main

    base, tasks = cpm_setup
    t = tasks["blue"]
    main(
        [
            "continual",
            "add",
            str(tmp_path / "s"),
            "--base",
            str(base),
            "--adapter",
            str(t["adapter"]),
            "--gram",
            str(t["gram"]),
            "--out",
            str(tmp_path / "o"),
            "--cpm-data",
            str(t["data"]),
            "--cpm-n",
            "3",
            "--routing",
            "hard",
            "--tau",
            "0.2",
        ]
    )
    cfg, projectors, prototypes = read_routing(tmp_path / "o")
    assert cfg["hard"] is True and cfg["tau"] == 0.2 and len(projectors) == 1 and prototypes.shape == (1, 32)
    assert load_state(tmp_path / "s")["tasks"][0]["cpm_images"] == 3


def test_routed_folder_is_what_eval_and_the_package_load(cpm_setup, tmp_path):
    """`forgetless.load_model` (what the evaluation harness loads with) installs the routing, and the eval cache's
    weights digest changes with the routing config (τ, hard/soft change the outputs, not the weight files)."""
    import forgetless
    from forgetless.eval.cache import weights_digest

    base, tasks = cpm_setup
    state = tmp_path / "state"
    _add(state, tasks["red"], tmp_path / "o1", base=base)
    _add(state, tasks["blue"], tmp_path / "o2")
    assert isinstance(forgetless.load_model(tmp_path / "o2").model.multi_modal_projector, RoutedProjector)
    before = weights_digest(tmp_path / "o2")
    f = tmp_path / "o2" / ROUTING_FILE
    f.write_text(f.read_text().replace('"hard": false', '"hard": true'))
    assert weights_digest(tmp_path / "o2") != before


def test_a_full_disk_while_routing_files_are_written_names_the_file(tmp_path, monkeypatch):
    import errno

    from forgetless import cpm

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(cpm, "save_file", full)
    with pytest.raises(OSError) as e:
        cpm.write_routing(tmp_path, ["t"], [{"w": torch.zeros(2)}], torch.zeros(1, 2))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / cpm.PROJECTORS_FILE)
