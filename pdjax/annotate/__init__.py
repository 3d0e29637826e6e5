"""Turn (prompt, response) pairs into planned-diffusion training data (METHOD §1).

Two annotators: `Annotator` asks any OpenAI-compatible chat endpoint (with the
instructions in `instructions.SYSTEM`), validates, retries with feedback and
resumes; `annotate_rules` needs no endpoint and splits list items / paragraphs
into the spans of one round. `validate_annotation` is the shared gate: the pdjax
parser, plus the check that the plan removed gives back the response.
"""

from pdjax.annotate.client import ChatClient, EndpointError
from pdjax.annotate.llm import (
    Annotator,
    EndpointUnavailable,
    Outcome,
    Retry,
    RunStopped,
    RunSummary,
    annotate_file,
    annotate_rows,
)
from pdjax.annotate.rows import Row, read_rows
from pdjax.annotate.rules import UnannotatableText, annotate_file_with_rules, annotate_rules, parts, topic_words
from pdjax.annotate.validate import AnnotationRejected, prepare_tokenizer, recompute_lengths, validate_annotation

__all__ = [
    "AnnotationRejected",
    "Annotator",
    "ChatClient",
    "EndpointError",
    "EndpointUnavailable",
    "Outcome",
    "Retry",
    "RunStopped",
    "Row",
    "RunSummary",
    "UnannotatableText",
    "annotate_file",
    "annotate_file_with_rules",
    "annotate_rows",
    "annotate_rules",
    "parts",
    "prepare_tokenizer",
    "read_rows",
    "recompute_lengths",
    "topic_words",
    "validate_annotation",
]
