"""The instructions an LLM annotator gets: the annotation language of METHOD §1 in plain words.

The system message explains the tags and rules with one worked example; the
user message carries one (prompt, response) pair; a rejected answer is sent
back with the reason, so the model can correct it.
"""

from __future__ import annotations

SYSTEM = """\
You annotate answers for *planned diffusion*, a way of writing an answer in two \
alternating steps: first a short plan that announces the parts to come, then \
those parts written all at the same time, in parallel.

You get a user's PROMPT and an assistant's RESPONSE. Reply with the RESPONSE \
marked up with the tags below. The tags are the only thing you may add.

THE TAGS

1. A promise announces one part (a span):
       <promise>-<topic>TOPIC N</topic>
   TOPIC is one to four words naming what the span says. It must not contain \
any digit. N is the length of the span in tokens divided by 10 and rounded up, \
a whole number from 1 to 99 (about 7 words per 10 tokens: a 20-word span gets \
3, a 70-word span gets 10). Write N as digits, after the topic words.
2. A span is a piece of the RESPONSE inside <async> and </async>.
3. <sync/> is a barrier: everything written before it becomes visible to what \
comes after it.

HOW A RESPONSE IS BUILT

- A round is: optional plain text, then its promises one after another, then \
its spans, exactly one span per promise, in the same order as the promises, \
directly one after another.
- After the last span of a round comes either <sync/> (then a new round \
starts) or the end of the response. Nothing else may follow the spans of a \
round: no text, no space, no newline.
- The spans of one round are written at the same time and cannot see each \
other. Each must make sense from the PROMPT, the text and promises before it, \
and the spans of earlier rounds. Put parts that are independent of each other \
(list items, separate points, separate paragraphs) in the same round.
- When later text depends on what earlier spans say (a summary, a conclusion, \
a comparison, a step that uses earlier results), end the round with <sync/> \
and write the dependent text after it: as the spans of a new round, or as \
plain text.
- Text that must be written in order (a one-line introduction, a short \
answer, a final remark) may stay plain, outside any tag: before the promises \
of a round, or after the last <sync/>. A response without independent parts \
stays plain: return it unchanged.
- Never put one tag inside another, never leave a tag unclosed, never put tags \
inside a promise, and use no other tags.

KEEP THE TEXT

Removing every tag and promise from your reply must give back the RESPONSE: \
every word and character in the same order, nothing added, nothing left out, \
nothing corrected. Keep the spaces and line breaks too; the ones that separate \
two spans go inside a span (at the end of the first or the start of the next).

Reply with the annotated response only: no explanation, no quotes, no code fences.

EXAMPLE

PROMPT:
Give me two tips for better sleep and tell me which is easiest.

RESPONSE:
Here are two tips.
1. Keep a fixed bedtime, even on weekends.
2. Avoid screens for an hour before bed.
The easiest is the first: it only needs an alarm.

Your reply:
Here are two tips.
<promise>-<topic>fixed bedtime 2</topic><promise>-<topic>no screens 1</topic>\
<async>1. Keep a fixed bedtime, even on weekends.
</async><async>2. Avoid screens for an hour before bed.
</async><sync/>The easiest is the first: it only needs an alarm."""


def user_message(prompt: str, response: str) -> str:
    """The user turn for one pair."""
    return f"PROMPT:\n{prompt}\n\nRESPONSE:\n{response}"


def feedback_message(feedback: str) -> str:
    """The user turn that sends a rejected annotation back."""
    return (
        f"Your annotation was rejected: {feedback}.\n"
        "Fix it and reply again with the whole annotated response only."
    )


def messages(prompt: str, response: str) -> list[dict[str, str]]:
    """The first request for one pair: system instructions and the pair."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(prompt, response)}]
