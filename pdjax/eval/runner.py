"""Decode instructions with one model and turn each result into an outputs record.

An `EvalModel` holds the model, its tokenizer and its compiled decoder. Before
the decoder's first timed batch on a device it decodes one prompt untimed, so
no latency includes compilation.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax

from pdjax.decode import DecodeConfig, DecodeInputError, DecodeOptions, Decoder, DecodeResult, model_forward
from pdjax.decode.model_info import default_model_path  # noqa: F401  (one definition, shared with pdjax.decode)
from pdjax.eval.prompts import Prompt
from pdjax.structure import ControlIds, MissingControlTokens, clean_tokens


def _eos_id(tokenizer: Any) -> int:
    """`<|im_end|>` if the vocabulary has it, else the tokenizer's eos (as `python -m pdjax.decode` does)."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise DecodeInputError("the tokenizer has neither <|im_end|> nor an eos token: nothing can end a response")
    return int(tokenizer.eos_token_id)


class EvalModel:
    """A model, its tokenizer, its control ids, and its decoder (compiled on first use)."""

    def __init__(self, model: Any, tokenizer: Any, config: DecodeConfig | Any, *, chat_template: bool = True,
                 system_prompt: str | None = None, name: str = "model", special: Any = None):
        from pdjax.model.tokenizer import DEFAULT_SYSTEM_PROMPT

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.name = name
        self.forward = model_forward(model)  # split once; replicas copy these parameters to their devices
        self.ids = self._control_ids()
        self.eos_id = self.ids.eos if self.ids is not None else _eos_id(tokenizer)
        if self.mode == "dream":  # Dream's own sampler (config: a DreamSamplerConfig; special: SpecialIds)
            from pdjax.decode.dream import dream_decoder

            self.decoder = dream_decoder(self.forward, tokenizer, config, self.ids, self.eos_id, special)
        else:
            self.decoder = Decoder(self.forward, eos_id=self.eos_id, ids=self.ids, config=config)
        self._warm: set[str] = set()  # devices the decoder has run on

    @property
    def mode(self) -> str:
        return self.config.mode

    def _control_ids(self) -> ControlIds | None:
        from pdjax.model.tokenizer import control_ids

        try:
            return control_ids(self.tokenizer)
        except MissingControlTokens:
            if self.mode not in ("ar", "dream"):  # AR and Dream decoding of a plain checkpoint need only its eos
                raise
            return None

    def encode(self, instruction: str) -> list[int]:
        """The prompt's token ids (chat template and system prompt as in METHOD §4 unless turned off)."""
        from pdjax.model.tokenizer import chat_prompt_ids

        system = self.system_prompt or None
        return chat_prompt_ids(self.tokenizer, instruction, system=system, chat_template=self.chat_template)

    def check(self, prompt: Prompt, prompt_ids: Sequence[int], options: DecodeOptions) -> None:
        """Raise `DecodeInputError` if the prompt cannot be answered as asked (too long, or, in diffusion
        mode, too long for ``options.max_new_tokens`` masks under ``max_length``)."""
        if self.mode == "dream":
            self.decoder.check_prompt(prompt_ids, prompt.index, options.max_new_tokens)
            return
        self.decoder.check_prompt(prompt_ids, prompt.index)
        new = options.max_new_tokens
        if self.mode == "diffusion" and new is not None and len(prompt_ids) + new > self.config.max_length:
            raise DecodeInputError(
                f"prompt {prompt.index} has {len(prompt_ids)} tokens: {new} masks need max_length >= "
                f"{len(prompt_ids) + new}, not {self.config.max_length}"
            )

    def text(self, token_ids: Sequence[int]) -> str:
        """The clean answer: plan, tags, [PAD] and everything from `<|im_end|>` on removed."""
        if self.mode == "dream":  # read up to the first eos
            from pdjax.decode.dream import answer_text

            return answer_text(self.tokenizer, token_ids, self.decoder.eos_ids).strip()
        if self.ids is not None:
            tokens = [int(t) for t in clean_tokens(token_ids, self.ids)]
        else:
            tokens = list(token_ids)
            tokens = tokens[: tokens.index(self.eos_id)] if self.eos_id in tokens else tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def load_eval_model(path: str, config: DecodeConfig, *, chat_template: bool = True, system_prompt: str | None = None,
                    dtype: str | None = None, attention_impl: str | None = None, quantize: str | None = None
                    ) -> EvalModel:
    """An `EvalModel` from a Hugging Face folder (config.json, safetensors, tokenizer files); ``quantize``
    (int8, int4) quantizes its weights while they load (`pdjax.model.quantize`)."""
    from pdjax.model import load_pretrained
    from pdjax.model.tokenizer import load_tokenizer, special_ids

    overrides: dict[str, Any] = {}
    if attention_impl is not None:
        overrides["attention_impl"] = attention_impl
    if dtype is not None:
        overrides.update(dtype=dtype, param_dtype=dtype)
    model = load_pretrained(path, quantize=quantize, **overrides)
    name = os.path.basename(os.path.normpath(path))
    tokenizer = load_tokenizer(path)
    special = special_ids(path, tokenizer)  # the configs' ids, checked against the tokenizer
    return EvalModel(model, tokenizer, config, chat_template=chat_template, system_prompt=system_prompt,
                     name=name, special=special)


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
        """Records for `prompts` (token ids in `encoded`, or encoded here), in batches of `config.batch_size`."""
        m = self.model
        encoded = [m.encode(p.instruction) for p in prompts] if encoded is None else list(encoded)
        out = []
        b = m.config.batch_size
        for start in range(0, len(prompts), b):
            batch = encoded[start : start + b]
            self._warm_up(batch[0], options)
            t0 = time.perf_counter()
            results = m.decoder.generate(batch, options, params=self.params)
            wall = time.perf_counter() - t0
            for p, ids, r in zip(prompts[start : start + b], batch, results):
                out.append(record(p, ids, r, m.text(r.token_ids), generator=generator, mode=m.mode, latency_s=wall,
                                  batch_fill=len(batch)))
        return out

    def _warm_up(self, prompt: list[int], options: DecodeOptions) -> None:
        key = str(self.device)
        if key not in self.model._warm:
            self.model.decoder.generate([prompt], options, params=self.params)  # compiles; not timed or recorded
            self.model._warm.add(key)


def decode_prompts(model: EvalModel, prompts: Sequence[Prompt], options: DecodeOptions = DecodeOptions(),
                   generator: str | None = None) -> list[dict[str, Any]]:
    """Decode `prompts` on the default device and return their records in order (no files)."""
    return Replica(model).decode(prompts, options, generator or model.name)
