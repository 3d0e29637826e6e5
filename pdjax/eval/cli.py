"""`python -m pdjax.eval {generate,compare,assemble}`: AlpacaEval answers and the speed-quality table.

    python -m pdjax.eval generate --mode pd --output pd.json [--model DIR] [--prompts alpaca_eval|FILE]
    python -m pdjax.eval generate --mode ar --output ar.json --model DIR_AR
    python -m pdjax.eval generate --mode dream --output dream.json --model Dream-org/Dream-v0-Instruct-7B
    python -m pdjax.eval compare ar.json pd.json [--annotations annotations.json ...] [--reference ar.json]
    python -m pdjax.eval assemble pd.json      # after a multi-host run whose part files were copied together

Judge the outputs with alpaca_eval (``alpaca_eval evaluate --model_outputs pd.json --reference_outputs ar.json``;
the files are its format, as they are), then pass the annotations.json it writes to `compare`: one row per
(model, judge reference) pair, repeated judgements counted once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Sequence

from pdjax import compile_cache
from pdjax.cli_errors import NON_NEGATIVE_INT, POSITIVE_INT, UserError, buckets_type, cli_main, number_type
from pdjax.decode import ALGS, DECODE_MODES, DecodeConfig, DecodeInputError, DecodeOptions
from pdjax.decode.cli import QUANTIZE_CHOICES, resolve_model
from pdjax.decode.model_info import DEFAULT_DIFFUSION_MASKS, read_model_info
from pdjax.eval.prompts import PromptError
from pdjax.eval.store import FormatError, SettingsMismatch
from pdjax.model.tokenizer import TokenIdMismatch

# Mistakes in what the user asked for: reported in one line, exit status 2.
USER_ERRORS = (DecodeInputError, PromptError, FormatError, SettingsMismatch, FileNotFoundError, UserError,
               TokenIdMismatch)

# DecodeOptions field -> command-line flag (the released decoder's names where it has them)
OPTION_FLAGS = {
    "steps_ratio": "--steps_ratio",
    "confidence_threshold": "--confidence_threshold",
    "length_scale": "--length_scale",
    "alg": "--alg",
    "temperature": "--temperature",
    "top_p": "--top_p",
    "top_k": "--top_k",
    "dense": "--disable_block_sparsity",
    "seed": "--seed",
    "max_new_tokens": "--max_new_tokens",
}
# DreamOptions fields beyond DecodeOptions' (eps stays Dream's 1e-3)
DREAM_OPTION_FLAGS = {"alg_temp": "--alg_temp"}


def _add_generate(sub: Any) -> None:
    d = DecodeOptions()
    g = sub.add_parser("generate", help="answer prompts into an alpaca_eval outputs file (resumable)")
    g.add_argument("--output", required=True, help="outputs JSON; part files go to OUTPUT.parts/")
    g.add_argument("--mode", choices=(*DECODE_MODES, "dream"), default="pd",
                   help="pd, ar, diffusion (pdjax's decoder), or dream: Dream's own diffusion_generate")
    g.add_argument("--model", default=None, help="an HF-layout folder or a Hugging Face id (ORG/NAME); default: "
                                                 "the shipped default model of --mode")
    g.add_argument("--prompts", default="alpaca_eval",
                   help="'alpaca_eval' (the 805 prompts of HF tatsu-lab/alpaca_eval; needs network) or a local "
                        "JSON/JSONL file of strings or objects with `instruction` (or `prompt`) and optional `dataset`")
    g.add_argument("--num_samples", type=POSITIVE_INT, default=None, help="answer only the first N prompts")
    g.add_argument("--generator", default=None, help="name in the outputs (default: from model, mode and knobs)")
    g.add_argument("--overwrite", action="store_true", help="discard earlier answers in OUTPUT instead of resuming")
    g.add_argument("--stop_after", type=POSITIVE_INT, default=None,
                   help="stop after N new samples (a partial run: run again without it to finish)")
    r = g.add_argument_group("decoding program")
    r.add_argument("--max_length", type=number_type(int, 2, what=">= 2"), default=2048, help="prompt + answer tokens")
    r.add_argument("--max_new_tokens", type=POSITIVE_INT, default=None,
                   help="answer budget below --max_length (default: max_length - prompt); in modes diffusion and "
                        "dream exactly N masks per prompt (Dream's max_new_tokens; default: the model's "
                        "generation_config.json max_new_tokens, else " + str(DEFAULT_DIFFUSION_MASKS) + ", as "
                        "pdjax.decode)")
    r.add_argument("--batch_size", type=POSITIVE_INT, default=1, help="prompts decoded together (the paper: 1)")
    r.add_argument("--max_spans", type=POSITIVE_INT, default=16, help="spans one round may hold (default 16)")
    r.add_argument("--buckets", type=buckets_type, default=(), help="comma-separated window sizes (default: powers of two)")
    r.add_argument("--attention_impl", default=None, help="xla, pallas_tpu, splash_dense (default: the model's)")
    r.add_argument("--dtype", default=None, help="parameter and compute dtype, e.g. bfloat16 (default: stored)")
    r.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only int8/int4 quantization at load time, as pdjax.decode (the default generator "
                   "name ends in -int8 / -int4)")
    compile_cache.add_flag(r)
    k = g.add_argument_group("decoding knobs (METHOD §4)")
    k.add_argument("--steps_ratio", type=float, default=d.steps_ratio)
    k.add_argument("--confidence_threshold", type=float, default=d.confidence_threshold)
    k.add_argument("--length_scale", type=float, default=d.length_scale)
    k.add_argument("--alg", choices=(*ALGS, "origin"), default=d.alg, help="origin: mode dream only")
    k.add_argument("--alg_temp", type=float, default=0.0,
                   help="mode dream: > 0 draws the positions to unmask from softmax(confidence / alg_temp)")
    k.add_argument("--temperature", type=float, default=d.temperature)
    k.add_argument("--top_p", type=float, default=d.top_p, help="1.0 turns it off")
    k.add_argument("--top_k", type=NON_NEGATIVE_INT, default=d.top_k, help="0 turns it off")
    k.add_argument("--disable_block_sparsity", action="store_true", help="dense groups (PD-DA)")
    k.add_argument("--seed", type=NON_NEGATIVE_INT, default=d.seed)
    c = g.add_argument_group("prompt format")
    c.add_argument("--system_prompt", default=None, help="default: 'You are a helpful assistant.'; '' for none")
    c.add_argument("--no_chat_template", action="store_true", help="tokenize the instruction as-is")
    s = g.add_argument_group("sharding")
    s.add_argument("--num_shards", type=POSITIVE_INT, default=None, help="default: the number of JAX processes")
    s.add_argument("--shard_index", type=NON_NEGATIVE_INT, default=None, help="default: this JAX process's index")
    s.add_argument("--devices", type=POSITIVE_INT, default=1,
                   help="local devices to decode on in parallel, one parameter copy each (default 1)")


def _add_compare(sub: Any) -> None:
    c = sub.add_parser("compare", help="speed-quality table of two or more outputs files")
    c.add_argument("outputs", nargs="+", help="outputs files (JSON list or JSONL)")
    c.add_argument("--reference", default=None, help="the AR outputs file (default: the one with mode 'ar')")
    c.add_argument("--annotations", nargs="*", default=[], help="alpaca_eval annotations.json file(s) for win rates")
    c.add_argument("--json", default=None, help="also write the table as JSON to this path")


def _add_assemble(sub: Any) -> None:
    a = sub.add_parser("assemble", help="write OUTPUT from its part files (after a multi-host run)")
    a.add_argument("output")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m pdjax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_compare(sub)
    _add_assemble(sub)
    return p


def options_from_args(args: argparse.Namespace) -> Any:
    """The options the flags name: `DecodeOptions`, or `DreamOptions` in mode dream."""
    if getattr(args, "mode", None) == "dream":
        from pdjax.decode.dream import DreamOptions

        return DreamOptions(steps_ratio=args.steps_ratio, alg=args.alg, alg_temp=args.alg_temp,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
                            seed=args.seed, max_new_tokens=args.max_new_tokens)
    return DecodeOptions(
        steps_ratio=args.steps_ratio,
        confidence_threshold=args.confidence_threshold,
        length_scale=args.length_scale,
        alg=args.alg,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or None,
        dense=args.disable_block_sparsity,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )


def default_generator(model_name: str, mode: str, options: DecodeOptions) -> str:
    """A generator name that tells runs apart: model, mode, and the knobs of the diffusion part."""
    name = "default" if model_name == ("diffusion" if mode == "dream" else mode) else model_name
    parts = [f"pdjax-{name}-{mode}"]
    if mode != "ar":
        parts.append(f"sr{options.steps_ratio:g}")
        if getattr(options, "confidence_threshold", None) is not None:
            parts.append(f"tau{options.confidence_threshold:g}")
        if mode == "pd" and options.dense:
            parts.append("dense")
        if mode == "dream":
            parts.append(options.alg)
    return "-".join(parts)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)  # logs and pipes get whole tables


def run_generate(args: argparse.Namespace) -> int:
    """The `generate` command."""
    import jax

    from pdjax.train.trainer import initialize_distributed

    initialize_distributed("auto")  # one host of several (JAX_COORDINATOR_ADDRESS, a TPU slice): join them first
    from pdjax.eval.generate import generate_outputs
    from pdjax.eval.prompts import load_prompts
    from pdjax.eval.report import speed_table, summarize_speed
    from pdjax.eval.runner import default_model_path, load_eval_model

    if (args.shard_index is None) != (args.num_shards is None):
        raise UserError("--shard_index and --num_shards go together")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        raise UserError(f"--shard_index must be in [0, {args.num_shards})")
    compile_cache.enable(disabled=args.no_compilation_cache)
    try:
        options = options_from_args(args)
    except ValueError as e:  # knobs out of range, an alg the mode lacks
        raise UserError(str(e)) from None
    # mode dream without --model: the shipped diffusion-only model (a Dream-layout checkpoint)
    model_path = resolve_model(args.model) if args.model else default_model_path(
        "diffusion" if args.mode == "dream" else args.mode)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        from pdjax.model.checkpoint import check_model_folder, orbax_checkpoint

        if orbax_checkpoint(model_path) is not None:
            check_model_folder(model_path)  # says it is an orbax checkpoint and how to export it
        raise UserError(f"no model at {model_path}: pass --model DIR (an HF-layout folder) or ORG/NAME (a Hub id)")
    if args.mode in ("diffusion", "dream") and args.max_new_tokens is None:
        # as pdjax.decode: the model's own mask count, never "the rest of max_length" (thousands of masks)
        options = dataclasses.replace(options, max_new_tokens=read_model_info(model_path).diffusion_masks)
    try:  # a bucket set that does not fit max_length, and the like
        if args.mode == "dream":
            from pdjax.decode.dream import DreamSamplerConfig

            config = DreamSamplerConfig(max_length=args.max_length, batch_size=args.batch_size, buckets=args.buckets)
        else:
            config = DecodeConfig(mode=args.mode, max_length=args.max_length, batch_size=args.batch_size,
                                  max_spans=args.max_spans, buckets=args.buckets)
    except ValueError as e:
        raise UserError(str(e)) from None
    local = jax.local_devices()
    if args.devices > len(local):
        raise UserError(f"--devices {args.devices}: this host has {len(local)} local device(s)")
    prompts = load_prompts(args.prompts, args.num_samples)
    model = load_eval_model(model_path, config, chat_template=not args.no_chat_template,
                            system_prompt=args.system_prompt, dtype=args.dtype, attention_impl=args.attention_impl,
                            quantize=args.quantize)
    quantized = f"-{args.quantize}" if args.quantize else ""
    generator = args.generator or default_generator(model.name, args.mode, options) + quantized
    devices = local[: args.devices] if args.devices > 1 else None
    console = _console()
    settings = {"model": os.path.abspath(model_path), "prompt_source": args.prompts, "dtype": args.dtype,
                "attention_impl": args.attention_impl}
    if args.quantize:  # absent otherwise, so runs written before the flag existed still resume
        settings["quantize"] = args.quantize

    from rich.progress import Progress

    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"{generator}", total=None)
        report = generate_outputs(
            model, prompts, args.output, options=options, generator=generator, settings=settings,
            shard_index=args.shard_index, num_shards=args.num_shards, devices=devices,
            stop_after=args.stop_after, overwrite=args.overwrite,
            on_batch=lambda n: progress.advance(task, n),
        )
    console.print(f"{report.written} new samples written; {report.already_done} of this shard's "
                  f"{report.shard_size} were already finished")
    a = report.assembly
    if a is None:
        console.print("process 0 assembles the output once every shard is finished")
        return 0
    if a.duplicates:
        console.print(f"[yellow]{a.duplicates} duplicate records ignored (an index written twice)[/yellow]")
    if a.missing:
        console.print(f"{len(a.missing)} of {len(prompts)} samples still missing (first: {a.missing[:5]}): run the "
                      f"same command again to continue (other shards' part files must be in {args.output}.parts/)")
    else:
        console.print(f"wrote {args.output} ({len(a.records)} samples)")
    console.print(speed_table(f"{generator}: {len(a.records)} of {len(prompts)} samples",
                              {generator: summarize_speed(a.records)}))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """The `compare` command."""
    from pdjax.eval.report import compare, compare_table, read_annotations, rows_json
    from pdjax.eval.store import read_outputs

    if len(args.outputs) < 2:
        raise UserError("compare needs two or more outputs files")
    files = {path: read_outputs(path) for path in args.outputs}
    annotations = read_annotations(args.annotations) if args.annotations else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, reference, paired = compare(files, reference=args.reference, annotations=annotations)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    _console().print(compare_table(rows, reference, paired))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"reference": reference, "paired": paired, "rows": rows_json(rows)}, f, indent=2)
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    """The `assemble` command."""
    from pdjax.eval.report import speed_table, summarize_speed
    from pdjax.eval.store import OutputStore

    a = OutputStore.existing(args.output).assemble()
    console = _console()
    if a.missing:
        console.print(f"{len(a.missing)} samples missing (first: {a.missing[:5]}); {args.output} not written")
        return 1
    console.print(f"wrote {args.output} ({len(a.records)} samples)")
    gens = sorted({str(r.get("generator")) for r in a.records})
    console.print(speed_table(args.output, {g: summarize_speed([r for r in a.records if str(r.get("generator")) == g])
                                            for g in gens}))
    return 0


@cli_main("pdjax.eval")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command."""
    args = build_parser().parse_args(argv)
    try:
        return {"generate": run_generate, "compare": run_compare, "assemble": run_assemble}[args.command](args)
    except USER_ERRORS as e:  # one line, exit status 2 (`cli_main`); --debug shows the traceback
        raise UserError(str(e)) from e

