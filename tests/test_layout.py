from __future__ import annotations

import math
import re

import pytest
from conftest import (
    build_llama_with_tokenizer,
    build_tiny_llava_original,
    save_current_names,
    tiny_llava_model,
    tiny_qwen25vl_model,
)
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from forgetless.checkpoint.layout import (
    LAYOUTS,
    PART_NAMES,
    describe,
    detect_layout,
    layer_of,
    name_aliases,
    part_of,
    select,
)
from forgetless.checkpoint.reader import CheckpointReader
from forgetless.errors import ForgetlessError

# where each family keeps its decoder layers, and what its projector tensors are (written out by hand)
LAYER_PREFIX = {
    "llava": "model.language_model.layers.",
    "llava_hf": "language_model.model.layers.",
    "llava_original": "model.layers.",
    "qwen2_vl": "model.language_model.layers.",
    "qwen2_vl_hf": "model.layers.",
    "causal_lm": "model.layers.",
}
N_PROJECTOR = {"llava": 4, "llava_hf": 4, "llava_original": 4, "qwen2_vl": 5, "qwen2_vl_hf": 5}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_llava_dir, tiny_qwen25vl_dir, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("layouts")
    return {
        "llava": save_current_names(tiny_llava_model(), tmp / "llava_current"),
        "llava_hf": tiny_llava_dir,
        "llava_original": build_tiny_llava_original(tiny_llava_dir, tmp / "llava_original"),
        "qwen2_vl": save_current_names(tiny_qwen25vl_model(), tmp / "qwen_current"),
        "qwen2_vl_hf": tiny_qwen25vl_dir,
        "causal_lm": tiny_llama_dir,
    }


def open_layout(path):
    r = CheckpointReader(path)
    return r, detect_layout(r.config, r.names())


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_detect_and_partition(dirs, family):
    r, layout = open_layout(dirs[family])
    names = r.names()
    assert layout.family == family
    assert layout.num_layers == 3
    for name in names:  # every tensor matches exactly one part pattern, and part_of agrees
        hits = [p for p, rx in layout.parts.items() if re.match(rx, name)]
        assert len(hits) == 1, (name, hits)
        assert part_of(layout, name) == hits[0]
    counts = {p: sum(part_of(layout, n) == p for n in names) for p in layout.parts}
    assert all(counts.values()), counts  # every part is present in these models
    assert counts["language.embed"] == counts["language.norm"] == counts["lm_head"] == 1
    assert counts["language.layers"] == 3 * (9 if family == "causal_lm" or "llava" in family else 12)
    if family != "causal_lm":
        assert counts["projector"] == N_PROJECTOR[family]
    else:
        assert set(layout.parts) == set(PART_NAMES) - {"vision", "projector"}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_layer_slices_match_brute_force(dirs, family):
    r, layout = open_layout(dirs[family])
    names = r.names()
    prefix = LAYER_PREFIX[family]

    def brute(indices):
        return {n for n in names for i in indices if n.startswith(f"{prefix}{i}.")}

    assert select(layout, names, ["language.layers[1:3]"]) == brute([1, 2])
    assert select(layout, names, ["language.layers[-1:]"]) == brute([2])
    assert select(layout, names, ["language.layers[0]"]) == brute([0])
    assert select(layout, names, ["language.layers[-1]"]) == brute([2])
    assert select(layout, names, ["language.layers[::2]"]) == brute([0, 2])
    assert select(layout, names, ["language.layers"]) == brute([0, 1, 2])
    for n in brute([1]):
        assert layer_of(layout, n) == 1
    assert all(layer_of(layout, n) is None for n in names if not n.startswith(prefix))
    language = select(layout, names, ["language"])
    assert language == brute([0, 1, 2]) | select(layout, names, ["language.embed", "language.norm"])
    assert len(select(layout, names, ["language", "lm_head"])) == len(language) + 1
    assert select(layout, names, ["re:q_proj"]) == {n for n in names if "q_proj" in n}


def test_legacy_and_current_select_the_same_tensors(dirs):
    r_cur, cur = open_layout(dirs["llava"])
    r_old, old = open_layout(dirs["llava_hf"])
    sels = ["projector", "vision", "lm_head", "language.layers[-2:]", "language.embed"]
    got_cur = select(cur, r_cur.names(), sels)
    got_old = select(old, r_old.names(), sels)
    # transformers' own load-time rename (legacy file -> in-memory names) is the reference
    model = LlavaForConditionalGeneration.from_pretrained(dirs["llava_hf"])
    current = set(model.state_dict())
    mapped = set()
    for n in got_old:
        hits = [a for a in name_aliases(n) if a in current]
        assert len(hits) == 1, (n, hits)
        mapped.add(hits[0])
    assert mapped == got_cur
    assert len(got_cur) == len(r_cur.names()) - 1 - 9  # all but the final norm and layer 0


@pytest.mark.parametrize(
    "family,model_cls",
    [("llava_hf", LlavaForConditionalGeneration), ("qwen2_vl_hf", Qwen2_5_VLForConditionalGeneration)],
)
def test_name_aliases_follow_transformers_renames(dirs, family, model_cls):
    r = CheckpointReader(dirs[family])
    current = set(model_cls.from_pretrained(dirs[family]).state_dict())
    legacy = set(r.names())
    assert legacy & current <= {"lm_head.weight"}  # the two namings differ (qwen2_vl keeps lm_head)
    for n in legacy - current:
        hits = [a for a in name_aliases(n) if a in current]
        assert len(hits) == 1, (n, hits)
        assert n in name_aliases(hits[0])  # and back


def test_describe_counts_everything(dirs):
    r, layout = open_layout(dirs["qwen2_vl_hf"])
    rows = describe(layout, r)
    assert [row["part"] for row in rows] == list(layout.parts)
    assert sum(row["tensors"] for row in rows) == len(r.names())
    assert sum(row["params"] for row in rows) == sum(math.prod(r.info(n).shape) for n in r.names())
    proj = next(row for row in rows if row["part"] == "projector")
    assert proj["params"] == sum(
        math.prod(r.info(n).shape) for n in r.names() if n.startswith("visual.merger.")
    )
    assert proj["dtypes"] == ["float32"]
    assert describe(layout, r.infos) == rows


@pytest.mark.parametrize(
    "selector,needle",
    [
        ("visoin", "unknown selector"),
        ("language.layers[3]", "out of range"),
        ("language.layers[a:b]", "bad layer index"),
        ("projector[0]", "only language.layers"),
        ("re:^nothing_like_this", "matches no tensor"),
        ("re:[", "invalid regex"),
    ],
)
def test_bad_selectors(dirs, selector, needle):
    r, layout = open_layout(dirs["llava_hf"])
    with pytest.raises(ForgetlessError) as e:
        select(layout, r.names(), ["projector", selector], file="recipe.yaml")
    msg = str(e.value)
    assert needle in msg and selector in msg and msg.startswith("recipe.yaml")
    if needle == "unknown selector":
        assert all(p in msg for p in PART_NAMES)


def test_part_missing_from_layout(dirs):
    r, layout = open_layout(dirs["causal_lm"])
    with pytest.raises(ForgetlessError, match="unknown selector 'vision'.*language.layers"):
        select(layout, r.names(), ["vision"])
    # a slice that is valid syntax but empty matches nothing
    with pytest.raises(ForgetlessError, match="matches no tensor"):
        select(layout, r.names(), ["language.layers[2:1]"])


def test_unknown_architecture_and_override(dirs):
    r = CheckpointReader(dirs["causal_lm"])
    with pytest.raises(ForgetlessError) as e:
        detect_layout({"architectures": ["MambaModel"]}, r.names())
    assert (
        "MambaModel" in str(e.value) and "layout override" in str(e.value) and "qwen2_vl_hf" in str(e.value)
    )
    layout = detect_layout({"architectures": ["MambaModel"]}, r.names(), override="causal_lm")
    assert layout.family == "causal_lm" and layout.num_layers == 3  # from the tensor names
    with pytest.raises(ForgetlessError, match="unknown layout 'nope'"):
        detect_layout(r.config, r.names(), override="nope")
    # without config.json the names alone decide, and the most specific complete layout wins
    assert detect_layout({}, CheckpointReader(dirs["llava"]).names()).family == "llava"
    assert detect_layout({}, r.names()).family == "causal_lm"


def test_a_tied_lm_head_is_named_with_the_selector_to_use(tmp_path):
    """A model whose lm_head is tied to the embeddings stores no lm_head tensor: the selector's error says so."""
    model = build_llama_with_tokenizer(tmp_path / "tied", layers=2, tie=True)
    with CheckpointReader(model) as r:
        lay = detect_layout(r.config, r.names())
        names = r.names()
    with pytest.raises(ForgetlessError, match="tied to its input embeddings") as e:
        select(lay, names, ["lm_head"], file=model)
    assert "select language.embed" in str(e.value)
    with pytest.raises(ForgetlessError, match="matches no tensor") as e:
        select(lay, names, ["re:^nothing"], file=model)
    assert "language.norm, re:" in str(
        e.value
    )  # the valid selectors: the parts this checkpoint stores, no lm_head


def test_the_earlier_family_names_are_still_read_as_overrides(tiny_llava_dir):
    with CheckpointReader(tiny_llava_dir) as r:
        assert detect_layout(r.config, r.names(), override="llava_legacy").family == "llava_hf"
        assert detect_layout(r.config, r.names()).family == "llava_hf"
