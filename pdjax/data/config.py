"""`DataConfig`: every knob of the training-data pipeline, passed explicitly (no global config)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pdjax.model.tokenizer import DEFAULT_SYSTEM_PROMPT
from pdjax.structure import MODES, Mode

Format = Literal["auto", "prompt_completion", "messages"]
FORMATS: tuple[str, ...] = ("auto", "prompt_completion", "messages")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read, how to lay it out, and how to pack and order it.

    ``source`` is a Hugging Face hub name or local folder (read with
    ``datasets.load_dataset(source, split=split)``), or local data files
    (``.json`` / ``.jsonl`` / ``.parquet``; several joined by commas, globs allowed).
    Rows hold ``prompt`` / ``completion`` strings (the released reference's
    columns) or chat ``messages``; ``format="auto"`` picks whichever exists.

    ``batch_size`` counts rows per step over *all* hosts; each host yields
    ``batch_size // shard_count`` rows of ``row_length`` tokens. The source is
    cut into ``batch_size`` contiguous lanes, one per row of the global batch,
    so the global batches do not depend on the host count (`pdjax.data.pipeline`).
    ``num_epochs=None`` repeats forever (the trainer stops at its step budget).
    ``pad_max``: each span gets U{0..pad_max} ``[PAD]`` tokens before its
    ``</async>``, drawn afresh every epoch (0 disables; METHOD §3).
    ``eos_fill_length`` (``diffusion_only`` only): the response is filled with
    ``<|im_end|>`` up to exactly this many tokens, as Dream trains its
    fixed-length generation, so the model learns where an answer ends when it
    later decodes a fixed number of masks; longer responses are skipped.
    ``shard_index`` / ``shard_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``: each host reads and packs its own lanes (a
    contiguous share of the source rows), and the hosts agree on one batch
    count (shorter lanes add all-padding filler rows). Set explicitly, no
    agreement is made.
    """

    source: str
    split: str = "train"
    format: Format = "auto"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    mode: Mode = "planned"
    row_length: int = 2048
    batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = 1
    shuffle: bool = True
    pad_max: int = 10
    ablate_topic: bool = False
    ablate_sync: bool = False
    eos_fill_length: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    chat_template: bool = True
    pack_window: int = 32  # open rows first-fit may still fill; more packs tighter but plans slower
    pad_token_id: int | None = None  # filler id of packed rows; default: the tokenizer's pad, else <|im_end|>
    skipped_path: str | None = None  # JSONL of skipped rows; a ".host{p}" suffix is added on multi-host runs
    max_source_rows: int | None = None  # read only the first N source rows (smoke runs)
    num_proc: int | None = None  # processes for the tokenize-and-validate pass (datasets.map; ~700 rows/s each)
    num_threads: int = 1  # grain threads building batches ahead of the trainer
    prefetch: int = 4  # batches built ahead
    cache_dir: str | None = None  # datasets cache folder
    shard_index: int | None = None
    shard_count: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        for name in ("row_length", "batch_size", "pack_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pad_max < 0:
            raise ValueError(f"pad_max must be >= 0, got {self.pad_max}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if self.eos_fill_length is not None:
            if self.mode != "diffusion_only":
                raise ValueError("eos_fill_length applies to mode='diffusion_only' only")
            if self.eos_fill_length < 1:
                raise ValueError(f"eos_fill_length must be >= 1, got {self.eos_fill_length}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both shard_index and shard_count, or neither (then jax decides)")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index must be in [0, {self.shard_count}), got {self.shard_index}")
        if self.num_threads < 0 or self.prefetch < 0:
            raise ValueError("num_threads and prefetch must be >= 0")
