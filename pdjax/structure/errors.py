"""Typed errors for malformed planned-diffusion responses (METHOD §1).

Every error names the rule it breaks and the token position (index into the
full token sequence, prompt included) where the violation is seen.
"""

from __future__ import annotations


class PlanError(ValueError):
    """A response that breaks a well-formedness rule of the annotation language."""

    rule: str = "malformed-plan"
    explanation: str = "malformed planned-diffusion response"

    def __init__(self, position: int, detail: str = ""):
        self.position = int(position)
        self.detail = detail
        message = f"{self.rule} at token {self.position}: {self.explanation}"
        super().__init__(message + (f" ({detail})" if detail else ""))


class NestedAsync(PlanError):
    rule = "nested-async"
    explanation = "nested <async>: opened inside another <async> block"


class UnclosedAsync(PlanError):
    rule = "unclosed-async"
    explanation = "unclosed <async>: the block is never closed by </async>"


class StrayAsyncEnd(PlanError):
    rule = "stray-async-end"
    explanation = "stray </async>: no <async> is open"


class ControlTokenInSpan(PlanError):
    rule = "control-token-in-span"
    explanation = "control token inside an <async> block: only text and [PAD] may stand there"


class UnclosedPromise(PlanError):
    rule = "unclosed-promise"
    explanation = "unclosed promise: <promise>-<topic> is not closed by </topic> before the next control token"


class StrayPromiseEnd(PlanError):
    rule = "stray-promise-end"
    explanation = "stray </topic>: no <promise>-<topic> is open"


class MissingPromiseLength(PlanError):
    rule = "missing-promise-length"
    explanation = "a promise must state its length as a 1-2 digit number"


class PromiseLengthTooLong(PlanError):
    rule = "promise-length-too-long"
    explanation = "a promise length has more than 2 digits"


class SpanCountMismatch(PlanError):
    rule = "span-count-mismatch"
    explanation = "the number of spans in a group differs from the number of promises of its round"


class TextAfterGroup(PlanError):
    rule = "text-after-group"
    explanation = "a group of spans must be followed directly by <sync/> or <|im_end|>"


class SyncWithoutPromise(PlanError):
    rule = "sync-without-promise"
    explanation = "<sync/> ends a round that has no promise"


class PadOutsideSpan(PlanError):
    rule = "pad-outside-span"
    explanation = "[PAD] may only fill a span"


class MaskInResponse(PlanError):
    rule = "mask-in-response"
    explanation = "<|mask|> may not appear in a training response"


class MissingEndOfTurn(PlanError):
    rule = "missing-end-of-turn"
    explanation = "the response does not end with <|im_end|>"


class ControlTokenAfterEnd(PlanError):
    rule = "control-token-after-end"
    explanation = "a control token follows the final <|im_end|>"


class UnstrippedPlan(PlanError):
    rule = "unstripped-plan"
    explanation = "AR-only and diffusion-only layouts take responses with the plan tags stripped"


ALL_ERRORS: tuple[type[PlanError], ...] = (
    NestedAsync,
    UnclosedAsync,
    StrayAsyncEnd,
    ControlTokenInSpan,
    UnclosedPromise,
    StrayPromiseEnd,
    MissingPromiseLength,
    PromiseLengthTooLong,
    SpanCountMismatch,
    TextAfterGroup,
    SyncWithoutPromise,
    PadOutsideSpan,
    MaskInResponse,
    MissingEndOfTurn,
    ControlTokenAfterEnd,
    UnstrippedPlan,
)
