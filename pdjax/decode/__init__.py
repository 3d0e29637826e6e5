"""Decoding (METHOD §4): sampling and confidence, schedules, plan layout, the while_loop decoder, the CLI."""

from pdjax.decode.api import DecodeInputError, Decoder, DecodeResult, vocab_size_of
from pdjax.decode.decoder import DECODE_MODES, DecodeConfig, DecodeOptions
from pdjax.decode.forward import CacheFn, Forward, HeadFn, HiddenFn, model_forward
from pdjax.decode.sampling import ALGS, SamplingParams, sample
from pdjax.decode.stats import DecodeStats

__all__ = [
    "ALGS",
    "DECODE_MODES",
    "CacheFn",
    "DecodeConfig",
    "DecodeInputError",
    "DecodeOptions",
    "DecodeResult",
    "DecodeStats",
    "Decoder",
    "Forward",
    "HeadFn",
    "HiddenFn",
    "SamplingParams",
    "model_forward",
    "sample",
    "vocab_size_of",
]
