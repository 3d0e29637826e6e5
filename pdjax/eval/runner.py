"""Decode instructions with one model and turn each result into an outputs record.

An `EvalModel` holds the model, its tokenizer and the compiled decoders: one
per ``max_length`` (a fixed ``max_length``, or ``prompt + max_new_tokens`` per
prompt length, which Dream-style diffusion needs: it always decodes exactly
that many masks). Before a decoder's first timed batch on a device it decodes
one prompt untimed, so no latency includes compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import threading
import time
from typing import Any, Sequence

import jax

from pdjax.decode import DecodeConfig, DecodeOptions, Decoder, DecodeResult, model_forward
from pdjax.eval.prompts import Prompt
from pdjax.structure import ControlIds, MissingControlTokens, clean_tokens


def default_model_path(mode: str) -> str:
    """The shipped default model of `mode` (pdjax/assets/default_model/{pd,ar,diffusion})."""
    return str(importlib.resources.files("pdjax").joinpath("assets", "default_model", mode))


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long answers may be: ``max_length`` (prompt + answer, one program) or ``max_new_tokens`` per prompt."""

    max_length: int = 2048
    max_new_tokens: int | None = None

    def for_prompt(self, prompt_len: int) -> int:
        """The decoder max_length that serves a prompt of `prompt_len` tokens."""
        return self.max_length if self.max_new_tokens is None else prompt_len + self.max_new_tokens


class EvalModel:
    """A model, its tokenizer, its control ids, and its compiled decoders (made on first use)."""

    def __init__(self, model: Any, tokenizer: Any, config: DecodeConfig, *, budget: Budget = Budget(),
                 chat_template: bool = True, system_prompt: str | None = None, name: str = "model"):
        from pdjax.model.tokenizer import DEFAULT_SYSTEM_PROMPT

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.budget = budget
        self.chat_template = chat_template
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.name = name
        self.forward = model_forward(model)  # split once: every decoder shares these parameters
        self.ids = self._control_ids()
        self.eos_id = self.ids.eos if self.ids is not None else int(tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
        self._decoders: dict[int, Decoder] = {}
        self._warm: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return self.config.mode

    def _control_ids(self) -> ControlIds | None:
        from pdjax.model.tokenizer import control_ids

        try:
            return control_ids(self.tokenizer)
        except MissingControlTokens:
            if self.mode != "ar":  # AR decoding of a plain checkpoint needs only its eos
                raise
            return None

    def encode(self, instruction: str) -> list[int]:
        """The prompt's token ids (chat template and system prompt as in METHOD §4 unless turned off)."""
        from pdjax.model.tokenizer import chat_prompt_ids

        system = self.system_prompt or None
        return chat_prompt_ids(self.tokenizer, instruction, system=system, chat_template=self.chat_template)

    def decoder(self, max_length: int) -> Decoder:
        """The decoder compiled for `max_length` (built once)."""
        with self._lock:
            if max_length not in self._decoders:
                config = dataclasses.replace(self.config, max_length=max_length)
                self._decoders[max_length] = Decoder(self.forward, eos_id=self.eos_id, ids=self.ids, config=config)
            return self._decoders[max_length]

    def text(self, token_ids: Sequence[int]) -> str:
        """The clean answer: plan, tags, [PAD] and everything from `<|im_end|>` on removed."""
        if self.ids is not None:
            tokens = [int(t) for t in clean_tokens(token_ids, self.ids)]
        else:
            tokens = list(token_ids)
            tokens = tokens[: tokens.index(self.eos_id)] if self.eos_id in tokens else tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def load_eval_model(path: str, config: DecodeConfig, *, budget: Budget = Budget(), chat_template: bool = True,
                    system_prompt: str | None = None, dtype: str | None = None,
                    attention_impl: str | None = None) -> EvalModel:
    """An `EvalModel` from a Hugging Face folder (config.json, safetensors, tokenizer files)."""
    from pdjax.model import load_pretrained
    from pdjax.model.tokenizer import load_tokenizer

    overrides: dict[str, Any] = {}
    if attention_impl is not None:
        overrides["attention_impl"] = attention_impl
    if dtype is not None:
        overrides.update(dtype=dtype, param_dtype=dtype)
    model = load_pretrained(path, **overrides)
    name = os.path.basename(os.path.normpath(path))
    return EvalModel(model, load_tokenizer(path), config, budget=budget, chat_template=chat_template,
                     system_prompt=system_prompt, name=name)


def record(prompt: Prompt, prompt_ids: Sequence[int], result: DecodeResult, text: str, *, generator: str,
           mode: str, latency_s: float, batch_fill: int) -> dict[str, Any]:
    """One outputs record: alpaca_eval's four fields, then what the request cost.

    ``latency_s`` is the wall time of the batch the request was decoded in (at batch size 1, the
    request's own latency); ``batch_fill`` is how many prompts shared that batch.
    """
    s = result.stats
    return {
        "instruction": prompt.instruction,
        "output": text,
        "generator": generator,
        "dataset": prompt.dataset,
        "index": prompt.index,
        "mode": mode,
        "latency_s": latency_s,
        "batch_fill": batch_fill,
        "model_calls": s.model_calls,
        "prefill_calls": s.prefill_calls,
        "plan_calls": s.plan_calls,
        "denoise_calls": s.denoise_calls,
        "commit_calls": s.commit_calls,
        "rounds": s.rounds,
        "groups": s.groups,
        "spans": s.spans,
        "span_lengths": list(s.span_lengths),
        "tokens": s.tokens_generated,
        "prompt_tokens": len(prompt_ids),
        "finish_reason": s.finish_reason,
        "token_ids": [int(t) for t in result.token_ids],
    }


def _on_device(params: Any, device: Any) -> Any:
    return params if device is None else jax.device_put(params, device)


class Replica:
    """The model's parameters on one device, decoding batches there (one per worker thread)."""

    def __init__(self, model: EvalModel, device: Any = None):
        self.model = model
        self.device = device
        self._params: Any = None

    @property
    def params(self) -> Any:
        """The model's parameters on this replica's device (copied there once)."""
        if self._params is None:
            self._params = _on_device(self.model.forward.params, self.device)
        return self._params

    def decode(self, prompts: Sequence[Prompt], options: DecodeOptions, generator: str,
               encoded: Sequence[list[int]] | None = None) -> list[dict[str, Any]]:
        """Records for `prompts` (token ids in `encoded`, or encoded here), in batches of one max_length."""
        m = self.model
        encoded = [m.encode(p.instruction) for p in prompts] if encoded is None else list(encoded)
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            groups.setdefault(m.budget.for_prompt(len(ids)), []).append(i)
        out: dict[int, dict[str, Any]] = {}
        b = m.config.batch_size
        for max_length, members in groups.items():
            decoder = m.decoder(max_length)
            params = self.params
            for start in range(0, len(members), b):
                chunk = members[start : start + b]
                batch = [encoded[i] for i in chunk]
                self._warm_up(decoder, params, batch[0], options, max_length)
                t0 = time.perf_counter()
                results = decoder.generate(batch, options, params=params)
                wall = time.perf_counter() - t0
                for i, r in zip(chunk, results):
                    out[i] = record(prompts[i], encoded[i], r, m.text(r.token_ids), generator=generator, mode=m.mode,
                                    latency_s=wall, batch_fill=len(chunk))
        return [out[i] for i in range(len(prompts))]

    def _warm_up(self, decoder: Decoder, params: Any, prompt: list[int], options: DecodeOptions, max_length: int) -> None:
        key = (max_length, str(self.device))
        if key not in self.model._warm:
            decoder.check_prompt(prompt)
            decoder.generate([prompt], options, params=params)  # compiles; not timed, not recorded
            self.model._warm.add(key)


def decode_prompts(model: EvalModel, prompts: Sequence[Prompt], options: DecodeOptions = DecodeOptions(),
                   generator: str | None = None) -> list[dict[str, Any]]:
    """Decode `prompts` on the default device and return their records in order (no files)."""
    return Replica(model).decode(prompts, options, generator or model.name)
