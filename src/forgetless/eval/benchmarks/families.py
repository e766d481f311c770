"""Imports every module that registers a benchmark (:func:`forgetless.eval.benchmarks.get` loads it on first use)."""

from . import captions, choice, vqa, yesno  # noqa: F401
