"""The demo's task generator, answer-only loss masking, and the fine-tuning helper (on a tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forgetless.demo import GENERAL, answer_scores, collate, encode, last_third, make_finetuned, zorblax_task
from forgetless.embedded import cache_dir, gguf_path
from forgetless.errors import ForgetlessError


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2 tokenizer: from the exported folder when it is cached, else straight from the GGUF file."""
    exported = cache_dir() / "smollm2-135m-instruct-float32"
    if (exported / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(exported)
    g = gguf_path()
    return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


def test_task_and_answer_only_labels(tok):
    task = zorblax_task(0)
    assert task == zorblax_task(0) and task.lexicon != zorblax_task(1).lexicon  # seeded
    assert len(task.lexicon) == len(set(task.lexicon.values())) == 16
    assert len(task.train) == 48 and len(task.heldout) == 16
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.heldout}
    # every held-out word is taught in training; the answer puts the animal's code first
    taught = " ".join(e.answer for e in task.train).split()
    for e in task.heldout:
        colour, animal = e.prompt.rsplit(": ", 1)[1].split()
        assert e.answer == f"{task.lexicon[animal]} {task.lexicon[colour]}"
        assert taught.count(task.lexicon[colour]) == 6 and taught.count(task.lexicon[animal]) == 6
    assert len(GENERAL) == 40 and all(g not in w and "{}" in s for _, s, g, w in GENERAL)

    for ex in task.train[:4] + task.heldout[:4]:
        ids, labels = encode(tok, ex)
        prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": ex.prompt}],
                                         tokenize=False, add_generation_prompt=True)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert ids[:n] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert labels[:n] == [-100] * n  # every prompt token is masked ...
        assert labels[n:] == ids[n:] and -100 not in labels[n:]  # ... and no answer token is
        assert tok.decode(labels[n:]) == ex.answer + tok.eos_token
        assert tok.decode(ids) == prompt + ex.answer + tok.eos_token

    # the loss sees the answer tokens only: padding and prompt positions contribute nothing
    rows = [encode(tok, ex) for ex in task.train[:3]]
    batch = collate(rows, tok.pad_token_id)
    assert batch["attention_mask"].sum().item() == sum(len(r[0]) for r in rows)
    assert (batch["labels"] != -100).sum().item() == sum(len(r[0]) - r[1].count(-100) for r in rows)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        s = answer_scores(model, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"]).loss
    assert s["token_logp"].numel() == (batch["labels"] != -100).sum().item()
    torch.testing.assert_close(-s["token_logp"].mean(), ref)  # same as transformers' masked loss


def _tiny_base(tmp_path, tok, layers=3):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    return base


@pytest.mark.parametrize("layers, trained", [(None, {2}), ([0, 1], {0, 1})])
def test_make_finetuned_changes_only_chosen_layers(tmp_path, tok, layers, trained):
    assert last_third(30) == list(range(20, 30)) and last_third(3) == [2]
    base = _tiny_base(tmp_path, tok)
    ft = make_finetuned(base, tmp_path / "ft", steps=2, seed=0, layers=layers, lr=1e-3, log=lambda s: None)
    b, f = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    assert b.keys() == f.keys()
    changed = {k for k in b if not torch.equal(b[k], f[k])}
    in_chosen = {k for k in b if any(k.startswith(f"model.layers.{i}.") for i in trained)}
    assert changed == in_chosen and len(changed) == 9 * len(trained)  # every tensor of the chosen layers moved
    meta = json.loads((ft / "finetune.json").read_text())
    assert set(meta["trained_tensors"]) == changed and len(meta["losses"]) == 2
    assert (ft / "tokenizer.json").exists() and not list(tmp_path.glob(".ft.tmp-*"))

    # same recipe: reused as is; another recipe: rebuilt
    stamp = (ft / "model.safetensors").stat().st_mtime_ns
    assert make_finetuned(base, ft, steps=2, seed=0, layers=layers, lr=1e-3, log=lambda s: None) == ft
    assert (ft / "model.safetensors").stat().st_mtime_ns == stamp
    make_finetuned(base, ft, steps=3, seed=0, layers=layers, lr=1e-3, log=lambda s: None)
    assert len(json.loads((ft / "finetune.json").read_text())["losses"]) == 3


def test_make_finetuned_rejects_layers_the_model_lacks(tmp_path, tok):
    base = _tiny_base(tmp_path, tok)
    with pytest.raises(ForgetlessError, match=r"0\.\.2"):
        make_finetuned(base, tmp_path / "ft", steps=1, layers=[3], log=lambda s: None)
    assert not (tmp_path / "ft").exists()
