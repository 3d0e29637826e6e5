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
import sys
from pathlib import Path
from typing import Any, Sequence

from pdjax import compile_cache
from pdjax.cli_errors import (  # UserError: the one-line error type of every pdjax command
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    UserError,
    buckets_type,
    cli_main,
    number_type,
)
from pdjax.decode.model_info import DEFAULT_DIFFUSION_MASKS, default_model_path, read_model_info

QUANTIZE_CHOICES = ("int8", "int4")  # pdjax.model.quantize's types (not imported here: --help stays light)

DEFAULT_MODEL = Path(default_model_path("pd"))  # the shipped planned-diffusion model
DEFAULT_MAX_LENGTH = 2048  # the released decoder's default; lower when the model's positions end earlier
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
                     help="a local HF-layout folder (config.json, safetensors, tokenizer) or a Hugging Face id "
                     "(default: the shipped model of --mode, pdjax/assets/default_model/{pd,ar,diffusion})")
    src.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                     help="weight-only quantization at load time with qwix: the projections, embedding and head as "
                     "int8 (or int4) with per-channel scales, quantized tensor by tensor as the checkpoint is read "
                     "(default: the checkpoint's float weights)")
    src.add_argument("--no_chat_template", action="store_true",
                     help="tokenize prompts as-is instead of the chat template with the system prompt")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--mode", choices=("pd", "ar", "diffusion", "dream"), default="pd",
                     help="pd: planned diffusion; ar: causal decoding with KV cache (needs only an eos token); "
                     "diffusion: Dream diffusion over --max_new_tokens masks; dream: Dream's own "
                     "diffusion_generate (full bidirectional attention, no cache; pdjax/decode/dream.py) (default: pd)")
    dec.add_argument("--max_length", type=number_type(int, 2, what=">= 2"), default=None,
                     help="prompt + response tokens. A promise whose span does not fit is shortened to the room "
                     "left (spans keep their length in promise order while it lasts); if not even its tags fit, "
                     f"the answer stops after the plan (default: the model's max_position_embeddings, at most "
                     f"{DEFAULT_MAX_LENGTH})")
    dec.add_argument("--max_new_tokens", type=POSITIVE_INT, default=None,
                     help="response budget below max_length; in mode diffusion, the number of masks (default: "
                     "max_length - prompt; in mode diffusion the model's generation_config.json max_new_tokens, "
                     "else " + str(DEFAULT_DIFFUSION_MASKS) + ")")
    dec.add_argument("--steps_ratio", type=number_type(float, 0.0, low_open=True, what="> 0"), default=1.0,
                     help="denoising steps per group = int(longest span * steps_ratio), at least 1 (default: 1.0)")
    dec.add_argument("--confidence_threshold", type=number_type(float, 0.0, 1.0, what="in [0, 1]"), default=None,
                     help="threshold variant: beyond the most confident mask per span, unmask only tokens whose "
                     "probability is >= this (ranked by probability; --alg is then unused)")
    dec.add_argument("--length_scale", type=number_type(float, 0.0, low_open=True, what="> 0"), default=10.0,
                     help="mask slots per unit of a promise's stated length (default: 10)")
    dec.add_argument("--alg", choices=("entropy", "maskgit_plus", "topk_margin", "origin"), default="entropy",
                     help="confidence that ranks masks for unmasking; origin (mode dream only): each mask moves "
                     "with probability 1 - s/t (default: entropy)")
    dec.add_argument("--alg_temp", type=number_type(float, 0.0, what=">= 0"), default=0.0,
                     help="mode dream: > 0 draws the positions to unmask from softmax(confidence / alg_temp)")
    dec.add_argument("--temperature", type=number_type(float, 0.0, what=">= 0"),
                     default=0.2, help="0 = greedy (default: 0.2)")
    dec.add_argument("--top_p", type=number_type(float, 0.0, 1.0, low_open=True, what="in (0, 1]"),
                     default=0.95, help="nucleus sampling, 1 = off (default: 0.95)")
    dec.add_argument("--top_k", type=POSITIVE_INT,
                     default=None, help="keep the k most likely tokens (default: off)")
    dec.add_argument("--disable_block_sparsity", action="store_true",
                     help="dense group attention (PD-DA): the spans of a round see each other")
    dec.add_argument("--use_cache", action="store_true",
                     help="accepted for compatibility: pdjax always decodes with its exact KV cache")
    dec.add_argument("--seed", type=NON_NEGATIVE_INT, default=42, help="sampling seed (default: 42)")
    run = p.add_argument_group("running")
    run.add_argument("--batch_size", type=POSITIVE_INT, default=1, help="prompts decoded together (default: 1)")
    run.add_argument("--max_spans", type=POSITIVE_INT, default=16, help="most promises per plan round (default: 16)")
    run.add_argument("--buckets", type=buckets_type, default=None,
                     help="comma-separated static call widths (default: powers of two from 32)")
    run.add_argument("--profile", action="store_true",
                     help="time each kind of model call with host callbacks and print the phase table "
                     "(slower; off by default)")
    compile_cache.add_flag(run)
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


def resolve_model(spec: str | None, mode: str = "pd") -> str:
    """A local folder for --model: the path itself, a downloaded HF snapshot, or the shipped model of `mode`."""
    if spec is None:
        default = default_model_path(mode)
        if not os.path.isfile(os.path.join(default, "config.json")):
            raise UserError(
                f"the default {mode} model is not shipped in this installation (expected a checkpoint at "
                f"{default}); pass --model DIR (an HF-layout folder) or --model ORG/NAME (a Hugging Face id)"
            )
        return default
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


def build(args: argparse.Namespace, path: str) -> tuple[Any, Any, Any]:
    """(decoder, tokenizer, control ids or None) for the parsed arguments and the model folder `path`."""
    from pdjax.decode.api import Decoder
    from pdjax.decode.decoder import DecodeConfig
    from pdjax.model import load_pretrained
    from pdjax.model.checkpoint import check_model_folder
    from pdjax.model.quantize import weight_format
    from pdjax.model.tokenizer import control_ids, load_tokenizer
    from pdjax.structure import MissingControlTokens

    check_model_folder(path)  # an orbax checkpoint, no config.json, no weights: said in one line
    try:
        tokenizer = load_tokenizer(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None
    try:
        ids = control_ids(tokenizer)
    except MissingControlTokens as e:
        if args.mode != "ar":
            raise UserError(f"mode {args.mode!r} needs the planned-diffusion control tokens: {e}") from None
        ids = None
    buckets = args.buckets or ()
    try:
        model = load_pretrained(path, device=getattr(args, "device", None),  # serve --replicas: one per device
                                quantize=getattr(args, "quantize", None))
        args.weights = weight_format(model)  # what ran, for the output
        if args.max_length is None:  # the positions the model was trained for, as the released decoder's 2048 at most
            args.max_length = default_max_length(model.config)
        config = DecodeConfig(mode=args.mode, max_length=args.max_length, batch_size=args.batch_size,
                              max_spans=args.max_spans, buckets=buckets, profile=args.profile)
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


def render(console: Any, tokenizer: Any, prompt: str, result: Any, ids: Any, text: str, mode: str,
           weights: str | None = None) -> None:
    """The terminal view: the plan with each span in its own colour, then the clean answer and a stats line
    (ending with the weights' format, e.g. int8, when given)."""
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
    console.print(Text(result.stats.line() + (f"; weights {weights}" if weights else ""), style="cyan"))
    for row in result.stats.phase_lines():  # --profile
        console.print(Text(row, style="dim cyan"))


class Status:
    """One line on stderr saying what the CLI is doing: a spinner with elapsed time on a terminal, else a log line."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._live: Any = None
        self._task: Any = None

    def __call__(self, text: str) -> None:
        """Show `text` (replacing the previous status)."""
        if not self.console.is_terminal:
            print(text, file=sys.stderr, flush=True)
            return
        if self._live is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=self.console, transient=True)
            self._live.start()
        if self._task is not None:
            self._live.remove_task(self._task)
        self._task = self._live.add_task(text, total=None)

    def close(self) -> None:
        """Clear the status line."""
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._task = None


@cli_main("pdjax.decode")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 for user errors, printed in one line without a traceback)."""
    args = build_parser().parse_args(argv)
    compile_cache.enable(disabled=args.no_compilation_cache)
    # pdjax runs its own JAX model and uses transformers for tokenizers only: its "PyTorch was not found" advice
    # would mislead a user of the no-extras install
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    status = Status()
    try:
        return _run(args, status)
    finally:
        status.close()


def _run(args: argparse.Namespace, status: Status) -> int:
    from pdjax.decode.api import DecodeInputError
    from pdjax.decode.decoder import DecodeOptions
    from pdjax.model.tokenizer import chat_prompt_ids

    if args.mode == "dream":  # Dream's own sampler: pdjax/decode/dream.py
        return _run_dream(args)
    prompts = read_prompts(args)
    path = resolve_model(args.model, args.mode)
    info = read_model_info(path)
    if args.model is not None and info.mode is not None and info.mode != args.mode:
        print(f"warning: {args.model} was trained for mode {info.mode!r}, not {args.mode!r}: expect empty or "
              f"malformed answers (drop --model to use the shipped {args.mode} model)", file=sys.stderr)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None and args.mode == "diffusion":  # never "the rest of max_length" masks
        max_new_tokens = info.diffusion_masks
    try:
        options = DecodeOptions(
            steps_ratio=args.steps_ratio, confidence_threshold=args.confidence_threshold,
            length_scale=args.length_scale, alg=args.alg, temperature=args.temperature,
            top_p=None if args.top_p is None or args.top_p >= 1 else args.top_p, top_k=args.top_k,
            dense=args.disable_block_sparsity, seed=args.seed, max_new_tokens=max_new_tokens,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    status(f"loading {path} ...")
    decoder, tokenizer, ids = build(args, path)
    decoder.on_compile = status
    try:
        prompt_ids = [chat_prompt_ids(tokenizer, p, chat_template=not args.no_chat_template) for p in prompts]
        checked = [decoder.check_prompt(p, i) for i, p in enumerate(prompt_ids)]
        decoder.compile(options=options)
        budget = f", {max_new_tokens} new tokens at most" if max_new_tokens else ""
        decoder.on_batch = lambda first, end, total: status(
            f"decoding prompt{'s' if end - first > 1 else ''} {first + 1}{f'-{end}' if end - first > 1 else ''} "
            f"of {total} in mode {args.mode}{budget} ...")
        results = decoder.generate(checked, options)
    except (DecodeInputError, ValueError) as e:
        raise UserError(str(e)) from None
    status.close()
    texts = [tokenizer.decode(answer_ids(decoder, r.prompt_ids, r.token_ids, ids), skip_special_tokens=True)
             for r in results]
    print_results(args, tokenizer, prompts, results, texts, ids)
    return 0


def _run_dream(args: argparse.Namespace) -> int:
    """`--mode dream`: the decode CLI's flags, Dream's own sampler (`pdjax.decode.dream`), the same output formats."""
    from pdjax.decode.dream import DreamOptions, DreamSamplerConfig, answer_text, dream_decoder
    from pdjax.decode.forward import model_forward
    from pdjax.model import load_pretrained
    from pdjax.model.quantize import weight_format
    from pdjax.model.tokenizer import chat_prompt_ids, load_tokenizer, special_ids

    prompts = read_prompts(args)
    path = resolve_model(args.model, "diffusion")  # no --model: the shipped diffusion-only model
    info = read_model_info(path)
    max_new_tokens = args.max_new_tokens or info.diffusion_masks
    try:
        options = DreamOptions(steps_ratio=args.steps_ratio, alg=args.alg, alg_temp=args.alg_temp,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               max_new_tokens=max_new_tokens)
        tokenizer = load_tokenizer(path)
        special = special_ids(path, tokenizer)  # the configs' ids, checked against the tokenizer
        model = load_pretrained(path, quantize=args.quantize)
        args.weights = weight_format(model)
        max_length = args.max_length or default_max_length(model.config)
        config = DreamSamplerConfig(max_length=max_length, batch_size=args.batch_size,
                                    buckets=tuple(args.buckets or ()))
        decoder = dream_decoder(model_forward(model), tokenizer, config, special=special)
        prompt_ids = [chat_prompt_ids(tokenizer, p, chat_template=not args.no_chat_template) for p in prompts]
        results = decoder.generate(prompt_ids, options)
    except (OSError, ValueError) as e:  # missing files, bad checkpoints or ids, knobs, prompts too long
        raise UserError(str(e)) from None
    texts = [answer_text(tokenizer, r.token_ids, decoder.eos_ids) for r in results]
    print_results(args, tokenizer, prompts, results, texts, None)
    return 0


def print_results(args: argparse.Namespace, tokenizer: Any, prompts: Sequence[str], results: Sequence[Any],
                  texts: Sequence[str], ids: Any) -> None:
    """One JSON line per prompt (``--json``), else the terminal view; shared by every decoding mode."""
    console = None
    if not args.json:
        from rich.console import Console

        console = Console()
    for prompt, result, text in zip(prompts, results, texts):
        if args.json:
            record = {"prompt": prompt, "mode": args.mode, "weights": getattr(args, "weights", None), "text": text,
                      "token_ids": result.token_ids,
                      "finish_reason": result.stats.finish_reason, "stats": result.stats.to_dict()}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            render(console, tokenizer, prompt, result, ids, text, args.mode, getattr(args, "weights", None))


def default_max_length(model_config: Any) -> int:
    """--max_length when not given: the positions the model was trained for, at most the released decoder's 2048."""
    return min(DEFAULT_MAX_LENGTH, int(model_config.max_position_embeddings))
