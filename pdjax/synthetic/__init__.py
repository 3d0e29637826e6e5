"""Checkable training data for the default model: generator, checker, and its small tokenizer.

Every span states one fact a program can verify (numbers, words, weekdays,
months, small price tables), so a decoder's answers can be scored on held-out
prompts. `python -m pdjax.synthetic --out DIR` builds train.jsonl, heldout.jsonl,
tokenizer/ and stats.json.
"""

from pdjax.synthetic.check import CheckResult, check_completion, summarize
from pdjax.synthetic.dataset import build_dataset, dataset_stats
from pdjax.synthetic.facts import Fact, parse_claims
from pdjax.synthetic.generate import DEFAULT_MIX, generate, render_completion, shape_counts, to_record
from pdjax.synthetic.tasks import SHAPES, Example, Unit
from pdjax.synthetic.tokenizer import CHATML_TEMPLATE, save_tokenizer, train_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_MIX",
    "SHAPES",
    "CheckResult",
    "Example",
    "Fact",
    "Unit",
    "build_dataset",
    "check_completion",
    "dataset_stats",
    "generate",
    "parse_claims",
    "render_completion",
    "save_tokenizer",
    "shape_counts",
    "summarize",
    "to_record",
    "train_tokenizer",
]
