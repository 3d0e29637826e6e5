"""`python -m pdjax.annotate {llm,rules}`: turn (prompt, response) JSONL into planned-diffusion training data.

  llm    send every pair to an OpenAI-compatible endpoint, validate, retry, resume
  rules  split list items / paragraphs into the spans of one round, no endpoint needed

Both write JSONL rows with `id`, `prompt`, `completion` (the annotated response,
without the final <|im_end|>) and a JSONL report of discarded rows with reasons.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from pdjax.cli_errors import UserError, cli_main
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL with a prompt and a response field per row")
    p.add_argument("--output", required=True, help="annotated JSONL (appended to by `llm`, so runs resume)")
    p.add_argument("--report", help="JSONL of discarded rows and why (default: OUTPUT stem + .discarded.jsonl)")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="transformers tokenizer folder or hub id (the model's own: lengths are counted in its tokens); "
        "the control tokens are added in memory if it lacks them",
    )
    p.add_argument("--prompt_field", default="prompt")
    p.add_argument("--response_field", default="response")
    p.add_argument("--length_scale", type=int, default=DEFAULT_LENGTH_SCALE, help="tokens per unit of promise length")
    p.add_argument("--limit", type=int, help="only the first N rows")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pdjax.annotate` (parsed by `main`; the docs test reads it too)."""
    p = argparse.ArgumentParser(
        prog="python -m pdjax.annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    llm = sub.add_parser("llm", help="annotate with an OpenAI-compatible chat endpoint")
    _common(llm)
    llm.add_argument("--base_url", help="endpoint base URL, e.g. http://localhost:8000/v1 (env OPENAI_BASE_URL)")
    llm.add_argument("--model", help="model name sent to the endpoint (env OPENAI_MODEL)")
    llm.add_argument("--api_key", help="bearer key (env OPENAI_API_KEY; prefer the env var)")
    llm.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    llm.add_argument("--max_attempts", type=int, default=3, help="requests per row, feedback included")
    llm.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    llm.add_argument("--temperature", type=float, default=0.0)
    llm.add_argument("--max_tokens", type=int, help="answer token limit sent to the endpoint")
    llm.add_argument(
        "--keep_lengths", action="store_true", help="keep the LLM's promise numbers instead of recounting them"
    )
    llm.add_argument(
        "--max_failures", type=int, default=64,
        help="stop the run after this many transport failures in a row (timeouts, refused connections, 429, 5xx); "
        "what was answered is kept and the same command resumes",
    )  # fmt: skip
    llm.add_argument("--retry_base_delay", type=float, default=1.0,
                     help="seconds before the first retry of a failed request; doubled per retry, with jitter")
    llm.add_argument("--retry_max_delay", type=float, default=60.0,
                     help="longest wait between retries (a server's Retry-After is honoured up to 600 s)")
    llm.add_argument("--retry_discarded", action="store_true", help="try the rows of the report again")
    llm.add_argument("--no_progress", action="store_true")
    rules = sub.add_parser("rules", help="annotate with the list / paragraph rules")
    _common(rules)
    return p


def load_annotation_tokenizer(path: str) -> Any:
    """The tokenizer of --tokenizer with the control tokens; a `UserError` naming the path if it cannot load."""
    from pdjax.annotate.validate import prepare_tokenizer
    from pdjax.model.tokenizer import load_tokenizer

    try:
        return prepare_tokenizer(load_tokenizer(path))
    except UserError as e:  # already one line naming the path
        raise UserError(f"--tokenizer {e}") from e
    except Exception as e:  # transformers raises OSError / ValueError / others with multi-line messages
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"--tokenizer {path}: cannot load a tokenizer ({first})") from e


def _say_retry(err: Any, seconds: float, failures: int) -> None:
    """One line on stderr per transport failure: what failed and how long the run waits."""
    detail = " ".join(str(err).split())[:160]
    # one write per line: workers fail concurrently, and print() writes the text and its newline separately
    sys.stderr.write(f"pdjax.annotate: {detail}; retrying in {seconds:.2f} s ({failures} failure(s) in a row)\n")
    sys.stderr.flush()


@cli_main("pdjax.annotate")
def main(argv: Sequence[str] | None = None) -> int:
    """Run one annotator over a file and print what it did."""
    args = build_parser().parse_args(argv)
    from pdjax.annotate.llm import (
        Annotator,
        EndpointUnavailable,
        Retry,
        annotate_file,
        default_report_path,
        summary_text,
    )

    if not os.path.isfile(args.input):
        raise UserError(f"--input {args.input}: no such file")
    tokenizer = load_annotation_tokenizer(args.tokenizer)
    report = args.report or default_report_path(args.output)
    fields = dict(prompt_field=args.prompt_field, response_field=args.response_field, limit=args.limit)
    if args.command == "rules":
        from pdjax.annotate.rules import annotate_file_with_rules

        counts = annotate_file_with_rules(
            args.input, args.output, tokenizer, report, length_scale=args.length_scale, **fields
        )
        print(
            f"written {counts['written']} ({counts['planned']} with a plan), discarded {counts['discarded']}"
            + (f" (see {report})" if counts["discarded"] else "")
        )
        return 0

    from pdjax.annotate.client import ChatClient

    try:
        client = ChatClient.from_env(
            args.base_url, args.model, args.api_key,
            timeout=args.timeout, temperature=args.temperature, max_tokens=args.max_tokens,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        retry = Retry(base_delay=args.retry_base_delay, max_delay=args.retry_max_delay, max_failures=args.max_failures,
                      on_wait=_say_retry)  # fmt: skip
        annotator = Annotator(
            client, tokenizer, max_attempts=args.max_attempts, fix_lengths=not args.keep_lengths,
            length_scale=args.length_scale, retry=retry,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        summary = annotate_file(
            args.input, args.output, annotator, report,
            concurrency=args.concurrency, retry_discarded=args.retry_discarded,
            progress=not args.no_progress, **fields,
        )  # fmt: skip
    except EndpointUnavailable as e:
        print(f"pdjax.annotate: {e}", file=sys.stderr, flush=True)
        return 1
    print(summary_text(summary) + (f"\nreport: {report}" if os.path.exists(report) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
