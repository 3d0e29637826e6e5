"""Evaluation: AlpacaEval answers from every decoding mode, and the speed-quality table (`python -m pdjax.eval`)."""

from pdjax.eval.generate import GenerateReport, generate_outputs, run_settings
from pdjax.eval.prompts import ALPACA_EVAL, Prompt, PromptError, load_prompts, prompts_from_rows, shard_of
from pdjax.eval.report import (
    CompareRow,
    SpeedSummary,
    UnknownGenerators,
    WinRate,
    compare,
    read_annotations,
    summarize_speed,
    unique_annotations,
    win_rate,
    win_rates_by_pair,
)
from pdjax.eval.runner import EvalModel, Replica, decode_prompts, default_model_path, load_eval_model
from pdjax.eval.store import Assembly, FormatError, OutputStore, SettingsMismatch, read_outputs, write_outputs

__all__ = [
    "ALPACA_EVAL",
    "Assembly",
    "CompareRow",
    "EvalModel",
    "FormatError",
    "GenerateReport",
    "OutputStore",
    "Prompt",
    "PromptError",
    "Replica",
    "SettingsMismatch",
    "SpeedSummary",
    "UnknownGenerators",
    "WinRate",
    "compare",
    "decode_prompts",
    "default_model_path",
    "generate_outputs",
    "load_eval_model",
    "load_prompts",
    "prompts_from_rows",
    "read_annotations",
    "read_outputs",
    "run_settings",
    "shard_of",
    "summarize_speed",
    "unique_annotations",
    "win_rate",
    "win_rates_by_pair",
    "write_outputs",
]
