"""A routed CPM folder loads outside forgetless: transformers' auto classes with ``trust_remote_code=True``
give the routed model, whose logits equal ``forgetless.load_model``'s, also in a process that cannot import
forgetless; without ``trust_remote_code`` transformers gives the plain merge, and older routed folders (no
code, no ``auto_map``) still load routed in forgetless."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils as dynamic_modules
from test_cpm import _add, _pixels, cpm_setup  # noqa: F401 (cpm_setup: a fixture)
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlavaForConditionalGeneration,
)

from forgetless.cpm import ROUTING_FILE, RoutedProjector, load_model, remote_code_config
from forgetless.remote import REMOTE_DIR
from forgetless.remote.cpm_router import AUTO_CLASSES, MODELING_FILE, ROUTED_CLASSES

IMAGE_TOKEN = 127  # the tiny LLaVA's image_token_index
PATCHES = 16  # (32 / 8)² patches of a 32-pixel image, the CLS token dropped


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """transformers copies a folder's modeling code into HF_MODULES_CACHE (under ~/.cache by default): here a
    temporary folder, in this process and in the processes the tests start."""
    cache = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_modules, "HF_MODULES_CACHE", cache)
        mp.setattr(sys, "path", list(sys.path))  # the cache joins sys.path on the first load
        mp.setenv("HF_MODULES_CACHE", cache)
        yield Path(cache)
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def routed(cpm_setup, tmp_path_factory):
    """Soft- and hard-routed folders after two tasks (red, blue); 2 red, 2 blue images and their prompts."""
    base, tasks = cpm_setup
    root = tmp_path_factory.mktemp("routed")
    _add(root / "state", tasks["red"], None, base=base)
    _add(root / "state", tasks["blue"], root / "soft")
    shutil.copytree(root / "soft", root / "hard")
    f = root / "hard" / ROUTING_FILE
    f.write_text(f.read_text().replace('"hard": false', '"hard": true'))
    pixels = torch.cat([_pixels(base, t["data"].parent)[:2] for t in tasks.values()])
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * PATCHES + [7, 8]] * len(pixels))
    return {"soft": root / "soft", "hard": root / "hard"}, ids, pixels


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def _routes(model, pixels):
    """The routing weights of each image: the routed projector's rule on its input (layer −2, CLS dropped)."""
    with torch.no_grad():
        f = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        return model.model.multi_modal_projector.route(f)


@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_trust_remote_code_gives_the_routed_model(routed, modules_cache, routing):
    folders, ids, pixels = routed
    folder = folders[routing]
    ours = load_model(folder)
    theirs = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(theirs).__name__ == "RoutedLlavaForConditionalGeneration"
    assert type(theirs.model.multi_modal_projector).__name__ == "RoutedProjector"
    assert theirs.model.multi_modal_projector.hard is (routing == "hard")
    assert list(modules_cache.rglob(MODELING_FILE)), "the code was copied into the temporary modules cache"
    # the red images route to task 0, the blue ones to task 1; the same weights in both models
    weights = _routes(theirs, pixels)
    assert weights.argmax(dim=-1).tolist() == [0, 0, 1, 1]
    assert torch.equal(weights, _routes(ours, pixels))
    if routing == "hard":
        assert torch.equal(weights, torch.eye(2)[[0, 0, 1, 1]])
    # the same logits bit for bit (one process, float32, the same code path), and not the plain merge's
    got = _logits(theirs, ids, pixels)
    assert torch.equal(got, _logits(ours, ids, pixels))
    plain = _logits(LlavaForConditionalGeneration.from_pretrained(folder).eval(), ids, pixels)
    assert (got - plain).abs().max() > 1e-3


def test_every_mapped_auto_class_gives_the_routed_model(routed, modules_cache):
    folders, ids, pixels = routed
    cfg = json.loads((folders["soft"] / "config.json").read_text())
    module = MODELING_FILE.removesuffix(".py")
    assert cfg["auto_map"] == {auto: f"{module}.RoutedLlavaForConditionalGeneration" for auto in AUTO_CLASSES}
    for name in (MODELING_FILE, "cpm_router.py"):
        assert (folders["soft"] / name).read_bytes() == (REMOTE_DIR / name).read_bytes()
    want = _logits(load_model(folders["soft"]), ids, pixels)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folders["soft"], trust_remote_code=True).eval()
        assert type(model).__name__ == "RoutedLlavaForConditionalGeneration", auto.__name__
        assert torch.equal(_logits(model, ids, pixels), want), auto.__name__
    # without trust_remote_code: transformers' own class, the base projector
    plain = AutoModelForImageTextToText.from_pretrained(folders["soft"])
    assert type(plain) is LlavaForConditionalGeneration
    assert not isinstance(plain.model.multi_modal_projector, RoutedProjector)


def test_the_folder_loads_where_forgetless_cannot_be_imported(routed, modules_cache, tmp_path):
    folders, ids, pixels = routed
    torch.save((ids, pixels), tmp_path / "inputs.pt")
    script = """
import sys
sys.modules["forgetless"] = None  # any import of forgetless (or of a submodule) raises ImportError
import torch
from transformers import AutoModelForImageTextToText
folder, inputs, out = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
ids, pixels = torch.load(inputs)
with torch.no_grad():
    torch.save(model(input_ids=ids, pixel_values=pixels).logits, out)
print(type(model).__name__, type(model.model.multi_modal_projector).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(folders["hard"]), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")]
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RoutedLlavaForConditionalGeneration", "RoutedProjector"]
    # another process may sum in another thread order: float32's default tolerance, not bit equality
    want = _logits(load_model(folders["hard"]), ids, pixels)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want)


def test_a_routed_folder_without_its_code_still_loads_routed_in_forgetless(routed, tmp_path):
    folders, ids, pixels = routed
    old = tmp_path / "old"
    shutil.copytree(folders["soft"], old)
    for name in (MODELING_FILE, "cpm_router.py"):
        (old / name).unlink()
    cfg = json.loads((old / "config.json").read_text())
    del cfg["auto_map"]
    (old / "config.json").write_text(json.dumps(cfg))
    model = load_model(old)
    assert isinstance(model.model.multi_modal_projector, RoutedProjector)
    assert torch.equal(_logits(model, ids, pixels), _logits(load_model(folders["soft"]), ids, pixels))


def test_only_architectures_with_a_routed_class_get_an_auto_map(tmp_path, tiny_llava_dir):
    import importlib

    modeling = importlib.import_module(f"forgetless.remote.{MODELING_FILE.removesuffix('.py')}")
    for arch, cls in ROUTED_CLASSES.items():
        assert getattr(modeling, cls).__mro__[2].__name__ == arch  # RoutedMixin, then the architecture
    assert set(remote_code_config(tiny_llava_dir)["auto_map"]) == set(AUTO_CLASSES)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"]}))
    assert remote_code_config(tmp_path) == {}
