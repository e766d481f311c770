"""Merge methods: one file per family, each starting with its rules (pure torch, in the papers' notation), then the
functions registered in METHODS that the engine calls; what makes them fast at 7B is apart, in :mod:`.fast`."""

from . import adapter, baselines, cgm, continual_merge, fisher, interpolation, regmean, sparsify, spectral  # noqa: F401  (registers the methods)
from .registry import METHODS, MethodSpec, get_method, merge_method

__all__ = ["METHODS", "MethodSpec", "get_method", "merge_method"]
