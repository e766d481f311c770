"""The deprecation guard (tests/deprecation_guard.py, opened around every test by conftest.py) blames our code for
the deprecations it causes, through torch's and transformers' call machinery, and not for a library's own; the
evaluator's KV cache goes through transformers' current API."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_llama_model
from deprecation_guard import deprecation_guard
from transformers import DynamicCache

from forgetless.eval.harness import cache_keyword, output_cache

torch.set_num_threads(1)
HERE = __file__


@contextmanager
def guarded():
    """The guard over every deprecation (shown whatever filters the run started with: FutureWarning is otherwise
    shown once per line), and the warnings it saw."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with deprecation_guard() as found:
            yield found, seen


def test_a_deprecated_keyword_passed_through_module_call_is_ours():
    model = tiny_llama_model()
    if cache_keyword(model.model) == "past_key_values":
        pytest.skip("this transformers (< 5.24) has no other name for past_key_values: nothing deprecated")
    ids = torch.tensor([[1, 5, 7]])
    with guarded() as (found, seen), torch.no_grad():
        model.model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    # transformers names torch's Module._call_impl; the guard names this line
    assert any(w.filename.endswith("torch/nn/modules/module.py") for w in seen)
    assert (
        len(found) == 1 and found[0].startswith(f"{HERE}:") and "`past_key_values` is deprecated" in found[0]
    )


def test_a_deprecated_output_field_read_by_us_is_ours():
    logging.Logger.warning_once.cache_clear()  # transformers logs this deprecation once per process
    model = tiny_llama_model()
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([[1, 5, 7]]), use_cache=True)
    if "cache" not in out:
        pytest.skip("this transformers (< 5.24) has no other name for past_key_values: nothing deprecated")
    with guarded() as (found, seen):
        legacy = out.past_key_values  # a log record, not a warning
    assert legacy is output_cache(out) and seen == []
    assert len(found) == 1 and found[0].startswith(f"{HERE}:") and "log record of transformers" in found[0]


def test_a_librarys_own_deprecated_call_is_not_ours():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama_model()
    with guarded() as (found, seen):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # PEFT reads the deprecated alias
    if not any("is_gradient_checkpointing" in str(w.message) for w in seen):
        pytest.skip("is_gradient_checkpointing is not deprecated in this transformers (< 5.23)")
    assert found == []
    with guarded() as (found, seen):
        _ = tiny_llama_model().is_gradient_checkpointing  # the same alias, read by us
    assert len(found) == 1 and found[0].startswith(f"{HERE}:") and "is_gradient_checkpointing" in found[0]


def test_kv_cache_keyword_and_field_are_the_current_ones():
    import inspect

    model = tiny_llama_model()
    params = inspect.signature(model.model.forward).parameters
    assert cache_keyword(model.model) == ("cache" if "cache" in params else "past_key_values")
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([[1, 5, 7]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3
