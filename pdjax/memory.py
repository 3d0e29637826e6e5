"""Per-device memory of fine-tuning and serving a Dream-shaped model, computed from its shape.

An analytic estimate (bytes of every resident array, per device), written out
term by term so a user can see where the memory goes before renting a slice:

- training: parameters, gradients and AdamW moments, sharded over fsdp x tensor
  (replicated over data); with LoRA the base is frozen (no gradient or moments);
  activations kept for the backward pass under the chosen remat policy; the
  float32 logits and their gradient (vocabulary sharded over tensor).
- serving: weights, the KV cache (kv heads sharded over tensor when they divide)
  and the larger of the widest decode call's activations and one sampling chunk's logits.

XLA adds temporaries and fragmentation on top; keep ~20% headroom, or ask the TPU compiler
itself with `python -m pdjax.aot` (docs/tpu.md).
"""

from __future__ import annotations

import argparse
import dataclasses

from pdjax.cli_errors import UserError, cli_main
from pdjax.model.config import DreamConfig

GiB = 1024**3
# Projections of one decoder layer that LoRA adapts: (input dim, output dim) as functions of the config.
_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Named byte counts per device; `total` is their sum."""

    what: str
    terms: tuple[tuple[str, float], ...]

    @property
    def total(self) -> float:
        return sum(b for _, b in self.terms)

    def table(self) -> str:
        width = max(len(n) for n, _ in self.terms)
        lines = [f"{self.what} (per device)"]
        lines += [f"  {n:<{width}}  {b / GiB:9.2f} GiB" for n, b in self.terms]
        lines.append(f"  {'total':<{width}}  {self.total / GiB:9.2f} GiB")
        return "\n".join(lines)


def _lora_dims(c: DreamConfig) -> list[tuple[int, int]]:
    """(inputs, outputs) of each projection LoRA targets."""
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    return [dims[t] for t in _LORA_TARGETS]


def _lora_params(c: DreamConfig, rank: int) -> int:
    return c.num_layers * sum(rank * (i + o) for i, o in _lora_dims(c))


def _activation_bytes_per_token_layer(c: DreamConfig, remat: str, tensor: int, compute_bytes: int) -> float:
    """Bytes one token keeps per layer for the backward pass under a remat policy."""
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    if remat == "full":  # only the layer input survives; the rest is recomputed
        return d * compute_bytes
    if remat in ("dots", "dots_no_batch"):  # matmul outputs: q, k, v, attention out, o, gate, up, down
        return (2 * d + (2 * q + 2 * kv + 2 * f) / tensor) * compute_bytes
    # none: matmul inputs and outputs, norms, the SwiGLU product, the attention statistics
    return (5 * d + (3 * q + 2 * kv + 3 * f) / tensor) * compute_bytes + c.num_heads / tensor * 8


def training_memory(
    config: DreamConfig,
    *,
    batch_per_device: float,
    seq_len: int,
    fsdp: int,
    tensor: int = 1,
    remat: str = "full",
    param_bytes: int = 4,
    compute_bytes: int = 2,
    optimizer_bytes: int = 4,
    lora_rank: int = 0,
    flash_attention: bool = True,
    grad_accum: int = 1,
) -> MemoryEstimate:
    """Per-device bytes of one training step.

    ``batch_per_device`` rows of ``seq_len`` tokens are processed by each (data x fsdp) shard;
    ``flash_attention`` False adds the [heads, T, T] float32 scores the `xla` path materialises.
    With ``grad_accum`` micro-batches, activations and logits are those of one micro-batch.
    """
    c = config
    shards = fsdp * tensor
    n = c.num_params
    terms: list[tuple[str, float]] = [("parameters", n * param_bytes / shards)]
    if lora_rank:
        r = _lora_params(c, lora_rank)
        terms += [("LoRA params + grads + AdamW", r * (param_bytes + param_bytes + 2 * optimizer_bytes) / shards)]
        # pdjax.train.lora.apply_lora merges every layer's targeted weights into float32 W + scale * b @ a before
        # the layer scan, and the backward pass holds the same-shaped cotangent (seen in the compiled v6e-8 step)
        targeted = c.num_layers * sum(i * o for i, o in _lora_dims(c))
        terms += [("LoRA-merged weights + their gradient (f32)", 2 * targeted * 4 / shards)]
    else:
        terms += [("gradients", n * param_bytes / shards), ("AdamW moments", 2 * n * optimizer_bytes / shards)]
    tokens = batch_per_device / grad_accum * seq_len  # activations live one micro-batch at a time
    per_layer = _activation_bytes_per_token_layer(c, remat, tensor, compute_bytes)
    work = _activation_bytes_per_token_layer(c, "none", tensor, compute_bytes) if remat != "none" else 0.0
    terms.append((f"activations (remat={remat})", tokens * (c.num_layers * per_layer + work)))
    if not flash_attention:
        terms.append(("attention scores (xla)", batch_per_device / grad_accum * c.num_heads / tensor * seq_len**2 * 4 * 2))
    terms.append(("logits + their gradient (f32)", tokens * c.vocab_size / tensor * 4 * 2))
    return MemoryEstimate("training", tuple(terms))


def serving_memory(
    config: DreamConfig,
    *,
    batch: int,
    max_length: int,
    tensor: int = 1,
    weight_bytes: int = 2,
    cache_bytes: int = 2,
    widest_call: int | None = None,
    sample_chunk: int | None = None,
    quantize: str | None = None,
) -> MemoryEstimate:
    """Per-device bytes of decoding ``batch`` prompts up to ``max_length`` tokens each (`pdjax.decode`'s program).

    ``widest_call`` is the most positions of one row a model call processes (default ``max_length``: the
    decoder's widest bucket). Besides the weights and the KV cache (``max_length`` + 1 slots: one is
    scratch), the program's temporaries are those of its widest model call: per layer the MLP's two
    [tokens, intermediate] products, about six [tokens, hidden] buffers and two query blocks of
    attention scores (`pdjax.attention.reference.SCORE_BYTES` each); or, when larger, those of one
    sampling chunk: a few float32 [chunk, vocabulary] arrays (`pdjax.decode.decoder.sample_chunk`).
    With ``quantize`` (int8, int4) the projections, embedding and head take 1 or 1/2 byte a value plus a
    float32 scale per output channel (`pdjax.model.quantize`); norms and biases keep ``weight_bytes``.
    """
    from pdjax.attention.reference import SCORE_BYTES, query_block

    c = config
    kv_shards = tensor if c.num_kv_heads % tensor == 0 else 1
    slots = max_length + 1
    cache = 2 * c.num_layers * batch * slots * c.num_kv_heads * c.head_dim * cache_bytes / kv_shards
    width = max_length if widest_call is None else widest_call
    tokens = batch * width
    heads = c.num_heads / tensor
    block = query_block(batch, width, c.num_heads, slots)
    scores = min(batch * heads * block * slots * 4, SCORE_BYTES)
    forward = tokens * (2 * c.intermediate_size / tensor + 6 * c.hidden_size) * cache_bytes + 2 * scores
    if sample_chunk is None:
        from pdjax.decode.decoder import DecodeConfig
        from pdjax.decode.decoder import sample_chunk as decoder_chunk

        sample_chunk = decoder_chunk(DecodeConfig(max_length=max(max_length, 2), batch_size=batch), c.vocab_size)
    sampling = 4 * sample_chunk * c.vocab_size * 4
    weights = c.num_params * weight_bytes
    if quantize is not None:
        from pdjax.model.quantize import weight_bytes as quantized_bytes
        from pdjax.model.transformer import layer_shapes

        shapes = {("layers", k): v for k, v in layer_shapes(c).items()}
        shapes.update({("embed_tokens",): (c.vocab_size, c.hidden_size), ("norm",): (c.hidden_size,)})
        if not c.tie_word_embeddings:
            shapes[("lm_head",)] = (c.vocab_size, c.hidden_size)
        weights = quantized_bytes(shapes, quantize, weight_bytes)
    return MemoryEstimate(
        "serving",
        (
            (f"weights ({quantize})" if quantize else "weights", weights / tensor),
            ("KV cache", cache),
            ("widest call (or sampling chunk)", max(forward, sampling)),
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pdjax.memory`."""
    p = argparse.ArgumentParser(prog="python -m pdjax.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dream_7b", help="a preset name (dream_7b, tiny) or a folder/config.json")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--batch_per_device", type=float, default=1.0, help="training rows per (data x fsdp) shard")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--param_bytes", type=int, default=4, help="4 for float32 master weights, 2 for bf16")
    p.add_argument("--lora_rank", type=int, default=0)
    p.add_argument("--serve_batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="serving weights quantized (int8/int4)")
    return p


@cli_main("pdjax.memory")
def main(argv: list[str] | None = None) -> None:
    """`python -m pdjax.memory`: print the estimate for a preset or a config.json."""
    args = build_parser().parse_args(argv)
    for flag in ("fsdp", "tensor", "seq_len", "serve_batch", "max_length", "param_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.lora_rank < 0:
        raise UserError(f"--lora_rank must be >= 0, got {args.lora_rank}")
    if not 0 < args.batch_per_device < float("inf"):
        raise UserError(f"--batch_per_device must be a positive number, got {args.batch_per_device}")
    preset = getattr(DreamConfig, args.model, None)
    try:
        config = preset() if callable(preset) else DreamConfig.from_hf(args.model)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"--model {args.model}: neither a preset (dream_7b, tiny) nor a folder with config.json") from None
    except (ValueError, KeyError, TypeError) as e:  # not JSON, missing keys, unsupported settings
        raise UserError(f"--model {args.model}: cannot read its config.json ({type(e).__name__}: {e})") from None
    print(f"model: {args.model}, {config.num_params / 1e9:.2f}B parameters")
    print(
        training_memory(
            config,
            batch_per_device=args.batch_per_device,
            seq_len=args.seq_len,
            fsdp=args.fsdp,
            tensor=args.tensor,
            remat=args.remat,
            param_bytes=args.param_bytes,
            lora_rank=args.lora_rank,
        ).table()
    )
    print(serving_memory(config, batch=args.serve_batch, max_length=args.max_length, tensor=args.tensor,
                         quantize=args.quantize).table())


if __name__ == "__main__":
    raise SystemExit(main())
