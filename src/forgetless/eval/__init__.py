"""Evaluation: task splits scored by multiple choice or exact match, the T/G/E/F scores, tables and plots."""

from .harness import (
    EvalOptions,
    OptionScores,
    TaskSpec,
    evaluate,
    exact_match,
    generate_answers,
    resolve_task,
    score_options,
)
from .metrics import compare, scores
from .report import TradeoffPoint, format_table, read_json, table_row, tradeoff_plot, write_json

__all__ = [
    "EvalOptions",
    "OptionScores",
    "TaskSpec",
    "TradeoffPoint",
    "compare",
    "evaluate",
    "exact_match",
    "format_table",
    "generate_answers",
    "read_json",
    "resolve_task",
    "score_options",
    "scores",
    "table_row",
    "tradeoff_plot",
    "write_json",
]
