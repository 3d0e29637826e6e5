"""Checkable training data for the default model: generator, checker, and its small tokenizer.

Every span states one fact a program can verify (numbers, words, weekdays,
months, small price tables), so a decoder's answers can be scored on held-out
prompts. `python -m pdjax.synthetic --out DIR` builds train.jsonl, heldout.jsonl,
tokenizer/ and stats.json. ``--tasks paper`` (`pdjax.synthetic.paper`) builds data of the
paper's shape instead: 2-4 spans of several facts per round; the default task set is the
data the shipped models were trained on and stays unchanged.
"""

from pdjax.synthetic.check import CheckResult, check_completion, summarize
from pdjax.synthetic.dataset import build_dataset, dataset_stats, ideal_calls
from pdjax.synthetic.facts import Fact, parse_claims
from pdjax.synthetic.generate import (
    DEFAULT_MIX,
    TASK_SETS,
    default_mix,
    generate,
    render_completion,
    shape_counts,
    to_record,
)
from pdjax.synthetic.tasks import SHAPES, Example, Unit
from pdjax.synthetic.tokenizer import CHATML_TEMPLATE, save_tokenizer, train_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_MIX",
    "SHAPES",
    "TASK_SETS",
    "CheckResult",
    "Example",
    "Fact",
    "Unit",
    "build_dataset",
    "check_completion",
    "dataset_stats",
    "default_mix",
    "generate",
    "ideal_calls",
    "parse_claims",
    "render_completion",
    "save_tokenizer",
    "shape_counts",
    "summarize",
    "to_record",
    "train_tokenizer",
]
