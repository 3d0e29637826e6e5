"""The hybrid AR + diffusion loss of METHOD §3, and the released code's loss (``recipe: reference``).

pdjax recipe, per document of a packed row:

- the noise level t ~ U(eps, 1) is drawn per document;
- every span content token (`Role.SPAN`: text and `[PAD]`, not the tags) is
  replaced by `<|mask|>` with probability t;
- a masked token j is predicted from position j-1 (Dream's reading, `pdjax.model.shift_logits`; here by
  shifting the targets, which leaves no shifted copy of the logits),
  its cross-entropy weighted 1/t;
- AR targets are `pdjax.structure.ar_targets` (computed here on device, row-local);
- loss = (sum AR losses + sum weighted diffusion losses) / (response tokens).

Normalisation (``normalize``): ``document`` (default) averages that per-document
loss over the documents of the batch, so every example weighs the same whether it
is packed or not, as in the released batch-1 training; ``token`` divides the sum
over the whole batch by its response-token count (long answers weigh more).
Both are kept as a numerator and a denominator (`LossTerms`), so gradient
accumulation over micro-batches gives exactly the loss of the whole batch.

reference recipe (the released trainer, METHOD §3): diffusion loss at the masked
position p with target token p+1 (no shift), tags maskable, AR losses divided
by t as well, `</async>` (and, in dense groups, `<async>`) never a target, the
final `<|im_end|>` predicting itself, normalised by response length + 1. Its
AR-only baseline is plain next-token cross-entropy averaged over the response
(tail included); its diffusion-only baseline masks the anchor too.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from pdjax.structure import IGNORE, MODES, Role, Segments

Recipe = Literal["pdjax", "reference"]
Normalize = Literal["document", "token"]
RECIPES: tuple[str, ...] = ("pdjax", "reference")
NORMALIZATIONS: tuple[str, ...] = ("document", "token")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the loss is computed; `mode` is the segment layout the data pipeline produced."""

    recipe: Recipe = "pdjax"
    mode: str = "planned"  # planned | dense | ar_only | diffusion_only
    eps: float = 1e-3  # t ~ U(eps, 1)
    normalize: Normalize = "document"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"loss.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.mode not in MODES:
            raise ValueError(f"loss.mode must be one of {MODES}, got {self.mode!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"loss.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"loss.eps must be in (0, 1), got {self.eps}")


class Corruption(NamedTuple):
    """The noised model input of one batch."""

    tokens: jax.Array  # [B, L] int32: masked positions hold <|mask|>
    masked: jax.Array  # [B, L] bool
    t: jax.Array  # [B, L] float32: the noise level of each token's document


class LossTerms(NamedTuple):
    """Numerators and denominator of the loss; add `LossTerms` of micro-batches, then read `.loss`."""

    ar: jax.Array  # sum of (normalised) AR token losses
    diffusion: jax.Array  # sum of (normalised, 1/t-weighted) diffusion token losses
    weight: jax.Array  # documents (normalize=document) or response tokens (normalize=token)
    ar_tokens: jax.Array  # AR targets counted
    diffusion_tokens: jax.Array  # masked tokens with a target

    @property
    def loss(self) -> jax.Array:
        return (self.ar + self.diffusion) / jnp.maximum(self.weight, 1e-9)

    @property
    def ar_loss(self) -> jax.Array:
        return self.ar / jnp.maximum(self.weight, 1e-9)

    @property
    def diffusion_loss(self) -> jax.Array:
        return self.diffusion / jnp.maximum(self.weight, 1e-9)

    def __add__(self, other: "LossTerms") -> "LossTerms":  # type: ignore[override]
        return LossTerms(*(a + b for a, b in zip(self, other)))


_RESPONSE = (Role.PLAN, Role.TAG, Role.SPAN)


def _isin(x: jax.Array, values: tuple[int, ...]) -> jax.Array:
    out = jnp.zeros(x.shape, bool)
    for v in values:
        out = out | (x == int(v))
    return out


def _next(x: jax.Array, fill) -> jax.Array:
    """x[:, i + 1] at i (fill at the last position): row-local, so batch sharding stays intact."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def maskable(seg: Segments, recipe: Recipe = "pdjax") -> jax.Array:
    """[B, L] bool: tokens the forward process may replace by `<|mask|>`.

    pdjax: span content (`Role.SPAN`). reference: every block token, tags
    included (and, in the diffusion-only layout, the anchor: the last prompt token).
    """
    if recipe == "pdjax":
        return seg.role == Role.SPAN
    return (seg.block_id != 0) & (seg.role != Role.PADDING)


def corrupt(key: jax.Array, tokens: jax.Array, seg: Segments, *, mask_id: int, cfg: LossConfig) -> Corruption:
    """The forward process: t ~ U(eps, 1) per document, each maskable token masked with probability t."""
    b, length = tokens.shape
    k_t, k_mask = jax.random.split(key)
    # One draw per possible doc id (0..L) of each row; a document reads its own.
    t_doc = cfg.eps + (1.0 - cfg.eps) * jax.random.uniform(k_t, (b, length + 1), jnp.float32)
    t = jnp.take_along_axis(t_doc, jnp.clip(seg.doc_id, 0, length), axis=1)
    masked = (jax.random.uniform(k_mask, (b, length), jnp.float32) < t) & maskable(seg, cfg.recipe)
    return Corruption(jnp.where(masked, jnp.asarray(mask_id, tokens.dtype), tokens), masked, t)


def ar_targets(tokens: jax.Array, seg: Segments) -> jax.Array:
    """[B, L] int32: `pdjax.structure.ar_targets` for a batch, vectorised (IGNORE where none).

    A position outside blocks predicts the nearest later response token outside
    blocks of its document; it predicts if it is plan text or the last prompt token.
    """
    b, length = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    outside = seg.block_id == 0
    is_ar_token = outside & _isin(seg.role, _RESPONSE)
    # nearest k > i with is_ar_token[k]: reverse running minimum of candidate indices, shifted by one.
    candidates = jnp.where(is_ar_token, idx, length)
    nearest = _next(jax.lax.cummin(candidates, axis=1, reverse=True), length)
    found = nearest < length
    safe = jnp.minimum(nearest, length - 1)
    same_doc = jnp.take_along_axis(seg.doc_id, safe, axis=1) == seg.doc_id
    next_role, next_doc = _next(seg.role, Role.PADDING), _next(seg.doc_id, -1)
    last_prompt = (seg.role == Role.PROMPT) & (next_role != Role.PROMPT) & (next_doc == seg.doc_id)
    predicts = outside & ((seg.role == Role.PLAN) | last_prompt)
    target = jnp.take_along_axis(tokens, safe, axis=1)
    return jnp.where(predicts & found & same_doc, target, IGNORE).astype(jnp.int32)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[B, L] float32 cross-entropy of `targets` under `logits` [B, L, V]; 0 where target is IGNORE.

    The target logit is read with a one-hot contraction, which stays local when
    the vocabulary axis is sharded.
    """
    logits = logits.astype(jnp.float32)
    valid = targets >= 0
    onehot = jax.nn.one_hot(jnp.where(valid, targets, 0), logits.shape[-1], dtype=logits.dtype)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)
    return jnp.where(valid, nll, 0.0)


def _doc_sum(values: jax.Array, doc: jax.Array) -> jax.Array:
    """[B, L]: at each token, the sum of `values` over its document (documents are contiguous runs)."""
    b, length = doc.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    prev_doc = jnp.concatenate([jnp.full_like(doc[:, :1], -1), doc[:, :-1]], axis=1)
    starts = jax.lax.cummax(jnp.where(doc != prev_doc, idx, 0), axis=1)
    ends = jax.lax.cummin(jnp.where(doc != _next(doc, -1), idx, length - 1), axis=1, reverse=True)
    csum = jnp.cumsum(values, axis=1)
    before = jnp.take_along_axis(csum, starts, axis=1) - jnp.take_along_axis(values, starts, axis=1)
    return jnp.take_along_axis(csum, ends, axis=1) - before


def _final_response_token(seg: Segments) -> jax.Array:
    """[B, L] bool: the last response token of each document (its final `<|im_end|>`)."""
    response = _isin(seg.role, _RESPONSE)
    later = _next(seg.doc_id, -1) == seg.doc_id
    next_response = _next(response, False)
    return response & ~(later & next_response)


def _normalised(
    ar_nll: jax.Array, diff_nll: jax.Array, per_doc_count: jax.Array, seg: Segments, normalize: Normalize
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum the token losses into (ar, diffusion, weight) numerators for one normalisation."""
    has_doc = (per_doc_count > 0) & (seg.doc_id != 0)
    if normalize == "document":
        w = jnp.where(has_doc, 1.0 / jnp.maximum(per_doc_count, 1.0), 0.0)
        prev_doc = jnp.concatenate([jnp.full_like(seg.doc_id[:, :1], -1), seg.doc_id[:, :-1]], axis=1)
        weight = jnp.sum(has_doc & (seg.doc_id != prev_doc)).astype(jnp.float32)
        return jnp.sum(ar_nll * w), jnp.sum(diff_nll * w), weight
    # token: per_doc_count sums to the batch's count over each document's tokens once per token,
    # so the denominator is the per-document count summed once per document.
    prev_doc = jnp.concatenate([jnp.full_like(seg.doc_id[:, :1], -1), seg.doc_id[:, :-1]], axis=1)
    weight = jnp.sum(jnp.where(has_doc & (seg.doc_id != prev_doc), per_doc_count, 0.0))
    return jnp.sum(ar_nll), jnp.sum(diff_nll), weight


def loss_terms(
    logits: jax.Array, tokens: jax.Array, seg: Segments, noise: Corruption, cfg: LossConfig
) -> LossTerms:
    """The loss of one batch as `LossTerms`: `logits` [B, L, V] from the model on `noise.tokens`.

    `tokens` are the clean tokens (the targets); `seg` the batch's segment ids.
    """
    if cfg.recipe == "pdjax":
        return _pdjax_terms(logits, tokens, seg, noise, cfg)
    return _reference_terms(logits, tokens, seg, noise, cfg)


def _pdjax_terms(logits, tokens, seg, noise, cfg) -> LossTerms:
    ar_tgt = ar_targets(tokens, seg)
    ar_nll = token_nll(logits, ar_tgt)
    # masked token j is predicted from position j-1 (Dream's shift): its nll is read at j-1 with the targets shifted,
    # not the logits (a shifted copy of the [B, L, V] logits was the step's largest temporary after the logits)
    diff_nll = token_nll(logits, jnp.where(_next(noise.masked, False), _next(tokens, 0), IGNORE)) / noise.t
    response = _isin(seg.role, _RESPONSE).astype(jnp.float32)
    count = _doc_sum(response, seg.doc_id)
    ar, diffusion, weight = _normalised(ar_nll, diff_nll, count, seg, cfg.normalize)
    return LossTerms(ar, diffusion, weight, jnp.sum(ar_tgt >= 0), jnp.sum(noise.masked))


def _reference_terms(logits, tokens, seg, noise, cfg) -> LossTerms:
    next_tok, next_doc, next_role = _next(tokens, 0), _next(seg.doc_id, -1), _next(seg.role, Role.PADDING)
    same_doc_next = next_doc == seg.doc_id
    if cfg.mode == "ar_only":
        # Plain SFT: every response (and tail) token is predicted from the one before; a mean, no 1/t.
        valid = same_doc_next & _isin(next_role, (*_RESPONSE, Role.TAIL))
        ar_nll = token_nll(logits, jnp.where(valid, next_tok, IGNORE))
        count = _doc_sum(valid.astype(jnp.float32), seg.doc_id)
        ar, diffusion, weight = _normalised(ar_nll, jnp.zeros_like(ar_nll), count, seg, cfg.normalize)
        return LossTerms(ar, diffusion, weight, jnp.sum(valid), jnp.zeros((), jnp.int32))

    ar_tgt = ar_targets(tokens, seg)
    if cfg.mode != "diffusion_only":
        # The released labels end with <|im_end|> at the final <|im_end|> itself.
        final = _final_response_token(seg) & (seg.block_id == 0)
        ar_tgt = jnp.where(final, tokens, ar_tgt)
    ar_nll = token_nll(logits, ar_tgt) / noise.t
    # Masked position p predicts token p+1 of its own block; tag targets are dropped.
    next_block = _next(seg.block_id, -1)
    diff_valid = noise.masked & same_doc_next & (next_role == Role.SPAN) & (next_block == seg.block_id)
    diff_nll = token_nll(logits, jnp.where(diff_valid, next_tok, IGNORE)) / noise.t
    response = _isin(seg.role, _RESPONSE).astype(jnp.float32)
    doc_response = _doc_sum(response, seg.doc_id)
    count = jnp.where(doc_response > 0, doc_response + 1.0, 0.0)  # positions from the last prompt token on
    ar, diffusion, weight = _normalised(ar_nll, diff_nll, count, seg, cfg.normalize)
    return LossTerms(ar, diffusion, weight, jnp.sum(ar_tgt >= 0), jnp.sum(diff_valid))
