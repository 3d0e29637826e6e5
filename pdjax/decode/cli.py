"""`python -m pdjax.decode`: decode prompts with a planned-diffusion model (or its AR / diffusion baselines).

A thin shell over `pdjax.decode.Decoder`: load the model and tokenizer,
format prompts, decode, and print either a coloured view (the plan, each span
in its own colour, the clean answer and a stats line) or one JSON object per
prompt (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

from pdjax.cli_errors import UserError, cli_main  # UserError: the one-line error type of every pdjax command

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model" / "pd"
SPAN_COLOURS = ("cyan", "magenta", "blue", "yellow", "bright_red", "bright_green", "bright_blue", "bright_magenta")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with the released decoder's flag names."""
    p = argparse.ArgumentParser(
        prog="python -m pdjax.decode",
        description="Planned diffusion decoding in JAX: an AR plan with promises, then their spans denoised in "
        "parallel. Modes ar and diffusion are baselines run by the same decoder with the same sampling settings.",
    )
    src = p.add_argument_group("input")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    src.add_argument("--prompt-file", "--prompt_file", dest="prompt_file",
                     help="one prompt per line, or JSONL with a 'prompt' or 'instruction' field")
    src.add_argument("--model", default=None,
                     help=f"a local HF-layout folder (config.json, safetensors, tokenizer) or a Hugging Face id "
                     f"(default: the shipped model at {DEFAULT_MODEL})")
    src.add_argument("--no_chat_template", action="store_true",
                     help="tokenize prompts as-is instead of the chat template with the system prompt")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--mode", choices=("pd", "ar", "diffusion", "dream"), default="pd",
                     help="pd: planned diffusion; ar: causal decoding with KV cache (needs only an eos token); "
                     "diffusion: Dream diffusion over max_length - prompt masks; dream: Dream's own "
                     "diffusion_generate (full bidirectional attention, no cache; pdjax/decode/dream.py) (default: pd)")
    dec.add_argument("--max_length", type=int, default=2048,
                     help="prompt + response tokens. A promise whose span does not fit is shortened to the room "
                     "left (spans keep their length in promise order while it lasts); if not even its tags fit, "
                     "the answer stops after the plan (default: 2048)")
    dec.add_argument("--max_new_tokens", type=int, default=None,
                     help="response budget below max_length; in mode diffusion, the number of masks "
                     "(default: max_length - prompt)")
    dec.add_argument("--steps_ratio", type=float, default=1.0,
                     help="denoising steps per group = int(longest span * steps_ratio), at least 1 (default: 1.0)")
    dec.add_argument("--confidence_threshold", type=float, default=None,
                     help="threshold variant: beyond the most confident mask per span, unmask only tokens whose "
                     "probability is >= this (ranked by probability; --alg is then unused)")
    dec.add_argument("--length_scale", type=float, default=10.0,
                     help="mask slots per unit of a promise's stated length (default: 10)")
    dec.add_argument("--alg", choices=("entropy", "maskgit_plus", "topk_margin", "origin"), default="entropy",
                     help="confidence that ranks masks for unmasking; origin (mode dream only): each mask moves "
                     "with probability 1 - s/t (default: entropy)")
    dec.add_argument("--alg_temp", type=float, default=0.0,
                     help="mode dream: > 0 draws the positions to unmask from softmax(confidence / alg_temp)")
    dec.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default: 0.2)")
    dec.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling, 1 = off (default: 0.95)")
    dec.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default: off)")
    dec.add_argument("--disable_block_sparsity", action="store_true",
                     help="dense group attention (PD-DA): the spans of a round see each other")
    dec.add_argument("--use_cache", action="store_true",
                     help="accepted for compatibility: pdjax always decodes with its exact KV cache")
    dec.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    run = p.add_argument_group("running")
    run.add_argument("--batch_size", type=int, default=1, help="prompts decoded together (default: 1)")
    run.add_argument("--max_spans", type=int, default=16, help="most promises per plan round (default: 16)")
    run.add_argument("--buckets", type=str, default=None,
                     help="comma-separated static call widths (default: powers of two from 32)")
    run.add_argument("--profile", action="store_true",
                     help="time each kind of model call with host callbacks (slower; off by default)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt and --prompt-file, in order; a UserError if there are none or one is empty."""
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"cannot read --prompt-file: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{args.prompt_file}:{n}: invalid JSON ({e})") from None
                text = record.get("prompt", record.get("instruction")) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{args.prompt_file}:{n}: a JSONL record needs a 'prompt' or 'instruction' string")
                prompts.append(text)
            else:
                prompts.append(line)
    if not prompts:
        raise UserError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise UserError(f"prompt {i} is empty")
    return prompts


def resolve_model(spec: str | None) -> str:
    """A local folder for --model: the path itself, a downloaded HF snapshot, or the shipped default."""
    if spec is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise UserError(
                f"the default model is not shipped in this installation yet (expected a checkpoint at "
                f"{DEFAULT_MODEL}); pass --model DIR (an HF-layout folder) or --model ORG/NAME (a Hugging Face id)"
            )
        return str(DEFAULT_MODEL)
    if os.path.isdir(spec):
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise UserError(f"--model {spec!r} is neither a folder nor a Hugging Face id (ORG/NAME)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"])
    except Exception as e:  # offline, unknown id, no access: all user-facing
        raise UserError(f"cannot fetch --model {spec!r} from the Hugging Face Hub: {e}") from None


def eos_id(tokenizer: Any) -> int:
    """`<|im_end|>` if the vocabulary has it, else the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither <|im_end|> nor an eos token: nothing can end a response")
    return int(tokenizer.eos_token_id)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(decoder, tokenizer, control ids or None) for the parsed arguments."""
    from pdjax.decode.api import Decoder
    from pdjax.decode.decoder import DecodeConfig
    from pdjax.model import load_pretrained
    from pdjax.model.tokenizer import control_ids, load_tokenizer
    from pdjax.structure import MissingControlTokens

    path = resolve_model(args.model)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None
    try:
        ids = control_ids(tokenizer)
    except MissingControlTokens as e:
        if args.mode != "ar":
            raise UserError(f"mode {args.mode!r} needs the planned-diffusion control tokens: {e}") from None
        ids = None
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else ()
    try:
        config = DecodeConfig(mode=args.mode, max_length=args.max_length, batch_size=args.batch_size,
                              max_spans=args.max_spans, buckets=buckets, profile=args.profile)
        model = load_pretrained(path)
        decoder = Decoder.from_model(model, eos_id=eos_id(tokenizer), ids=ids, config=config)
    except (OSError, ValueError) as e:  # missing files, mismatched checkpoints, unsupported configs, bad knobs
        raise UserError(str(e)) from None
    return decoder, tokenizer, ids


def answer_ids(decoder: Any, prompt_ids: list[int], token_ids: list[int], ids: Any) -> list[int]:
    """The clean answer's token ids: plan, tags, [PAD] and everything from <|im_end|> on removed."""
    if ids is not None:
        from pdjax.structure import clean_tokens

        return [int(t) for t in clean_tokens(prompt_ids + token_ids, ids, start=len(prompt_ids))]
    eos = decoder.eos_id
    return token_ids[: token_ids.index(eos)] if eos in token_ids else list(token_ids)


def render(console: Any, tokenizer: Any, prompt: str, result: Any, ids: Any, text: str, mode: str) -> None:
    """The terminal view: the plan with each span in its own colour, then the clean answer and a stats line."""
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.text import Text

    from pdjax.structure import PlanError, plan_view

    decode = lambda toks: tokenizer.decode(list(toks), skip_special_tokens=False)  # noqa: E731
    console.print(Rule(f"[bold]pdjax {mode}[/bold]"))
    console.print(Text(prompt, style="red"))
    if mode == "pd":
        view = Text()
        try:
            pieces = plan_view(result.prompt_ids + result.token_ids, ids, start=len(result.prompt_ids))
        except PlanError:  # a response cut by the budget inside a promise: show it raw
            pieces = None
            view.append(decode(result.token_ids), style="green")
        for piece in pieces or []:
            if piece.kind == "text":
                view.append(decode(piece.tokens), style="green")
            elif piece.kind == "promise":
                view.append(f" ⟨{decode(piece.tokens).strip()}⟩ ", style="bold green")
            elif piece.kind == "span":
                colour = SPAN_COLOURS[piece.index % len(SPAN_COLOURS)]
                view.append(f"\n[{piece.round}.{piece.index}] ", style=f"dim {colour}")
                view.append(decode(piece.tokens), style=colour)
            else:
                view.append("\n── sync ──\n", style="dim")
        console.print(Panel(view, title="plan and spans", border_style="green"))
    console.print(Panel(Text(text), title="answer", border_style="white"))
    console.print(Text(result.stats.line(), style="cyan"))


@cli_main("pdjax.decode")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 for user errors, printed without a traceback)."""
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    from pdjax.decode.api import DecodeInputError
    from pdjax.decode.decoder import DecodeOptions
    from pdjax.model.tokenizer import chat_prompt_ids

    if args.mode == "dream":  # Dream's own sampler: pdjax/decode/dream.py
        from pdjax.decode.dream import run_decode_cli

        return run_decode_cli(args)
    prompts = read_prompts(args)
    try:
        options = DecodeOptions(
            steps_ratio=args.steps_ratio, confidence_threshold=args.confidence_threshold,
            length_scale=args.length_scale, alg=args.alg, temperature=args.temperature,
            top_p=None if args.top_p is None or args.top_p >= 1 else args.top_p, top_k=args.top_k,
            dense=args.disable_block_sparsity, seed=args.seed, max_new_tokens=args.max_new_tokens,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    decoder, tokenizer, ids = build(args)
    try:
        prompt_ids = [chat_prompt_ids(tokenizer, p, chat_template=not args.no_chat_template) for p in prompts]
        results = decoder.generate(prompt_ids, options)
    except (DecodeInputError, ValueError) as e:
        raise UserError(str(e)) from None
    console = None
    if not args.json:
        from rich.console import Console

        console = Console()
    for prompt, result in zip(prompts, results):
        text = tokenizer.decode(answer_ids(decoder, result.prompt_ids, result.token_ids, ids), skip_special_tokens=True)
        if args.json:
            record = {"prompt": prompt, "mode": args.mode, "text": text, "token_ids": result.token_ids,
                      "finish_reason": result.stats.finish_reason, "stats": result.stats.to_dict()}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            render(console, tokenizer, prompt, result, ids, text, args.mode)
    return 0
