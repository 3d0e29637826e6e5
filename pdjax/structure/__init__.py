"""The plan language: control tokens, parsing, segment ids, attention masks, targets.

This package imports nothing else of pdjax; everything else builds on it.
"""

from pdjax.structure.control import (
    CONTROL_STRINGS,
    RELEASED_ADD_ORDER,
    ControlIds,
    MissingControlTokens,
    add_control_tokens,
)
from pdjax.structure.display import Piece, clean_tokens, plan_view
from pdjax.structure.errors import PlanError
from pdjax.structure.mask import allowed, attention_mask
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE, ParsedResponse, Promise, Round, Span, parse_response
from pdjax.structure.segments import (
    MODES,
    NEVER,
    Mode,
    Role,
    Segments,
    pack_documents,
    padding_segments,
    segments_from_tokens,
    strip_plan,
)
from pdjax.structure.targets import IGNORE, ar_targets

__all__ = [
    "CONTROL_STRINGS",
    "DEFAULT_LENGTH_SCALE",
    "IGNORE",
    "MODES",
    "NEVER",
    "RELEASED_ADD_ORDER",
    "ControlIds",
    "MissingControlTokens",
    "Mode",
    "ParsedResponse",
    "Piece",
    "PlanError",
    "Promise",
    "Role",
    "Round",
    "Segments",
    "Span",
    "add_control_tokens",
    "allowed",
    "ar_targets",
    "attention_mask",
    "clean_tokens",
    "pack_documents",
    "padding_segments",
    "parse_response",
    "plan_view",
    "segments_from_tokens",
    "strip_plan",
]
