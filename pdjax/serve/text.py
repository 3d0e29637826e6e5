"""From a response's final tokens, as they arrive, to the answer text and the plan text.

A token goes to the plan (promises and `<sync/>`), is dropped (span tags,
`[PAD]`, masks) or joins the answer, exactly as `pdjax.structure.clean_tokens`
reads a finished response, so the answer equals the CLI's `text`. Text already
sent never changes: a trailing incomplete UTF-8 character, and while streaming
the last characters that could begin a stop string, are held back.
"""

from __future__ import annotations

from typing import Any, Sequence

from pdjax.structure import ControlIds


class AnswerText:
    """The answer and plan of one response, fed its final tokens in order (`feed`), read as deltas (`delta`)."""

    def __init__(self, tokenizer: Any, ids: ControlIds | None, eos_id: int, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids = ids
        self.eos_id = eos_id
        self.stop = list(stop)
        self.answer_ids: list[int] = []
        self.plan_ids: list[int] = []
        self.ended = False  # the answer's <|im_end|> was read
        self.in_promise = False
        self.stopped = False  # a stop string was found: the answer ends before it
        self._sent_text = 0
        self._sent_plan = 0
        if ids is not None:
            self._dropped = {ids.async_start, ids.async_end, ids.pad, ids.mask}

    def feed(self, tokens: Sequence[int]) -> None:
        """Read the next final response tokens."""
        ids = self.ids
        for tok in tokens:
            tok = int(tok)
            if self.ended:
                return
            if ids is None:
                if tok == self.eos_id:
                    self.ended = True
                else:
                    self.answer_ids.append(tok)
            elif self.in_promise:
                self.plan_ids.append(tok)
                self.in_promise = tok != ids.promise_end
            elif tok == ids.promise_start:
                self.plan_ids.append(tok)
                self.in_promise = True
            elif tok == ids.sync:
                self.plan_ids.append(tok)
            elif tok in self._dropped:
                continue
            elif tok == ids.eos:
                self.ended = True
            else:
                self.answer_ids.append(tok)

    @property
    def text(self) -> str:
        """The answer so far, cut before the first stop string (which sets `stopped`)."""
        text = self.tokenizer.decode(self.answer_ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return text[: min(cuts)]
        return text

    @property
    def plan(self) -> str:
        """The plan's tokens so far as text, control tags included."""
        return self.tokenizer.decode(self.plan_ids, skip_special_tokens=False)

    def delta(self, final: bool = False) -> tuple[str, str]:
        """(answer text, plan text) not sent yet; `final` releases everything held back."""
        text, plan = self.text, self.plan
        end = len(text)
        if not (final or self.stopped):
            hold = max((len(s) for s in self.stop), default=1) - 1
            end = max(self._sent_text, end - hold)
            while end > self._sent_text and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        plan_end = len(plan)
        if not final:
            while plan_end > self._sent_plan and plan[plan_end - 1] == "\ufffd":
                plan_end -= 1
        out = text[self._sent_text : end], plan[self._sent_plan : plan_end]
        self._sent_text, self._sent_plan = max(self._sent_text, end), max(self._sent_plan, plan_end)
        return out
