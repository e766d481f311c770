"""Merge methods: one file per family, each method a pure function registered in METHODS."""

from . import adapter, baselines, cgm, fisher, regmean  # noqa: F401  (registers the methods)
from .registry import METHODS, MethodSpec, get_method, merge_method

__all__ = ["METHODS", "MethodSpec", "get_method", "merge_method"]
