"""From source rows to validated training documents, and from a document to its tokens and segments.

`Preparer` is the one pass over this host's rows (run through
``datasets.Dataset.map``, so it can use several processes and is cached): it
formats the chat prompt (METHOD §4 step 1), tokenizes the completion, applies
the text ablation, validates the plan with `parse_response` and lays out the
mode's response. Every row it cannot use comes back with a rule, a position
and a detail instead of tokens. `build_document` then makes one epoch's copy
of a document: its `[PAD]` draw inserted and its segment ids computed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pdjax.data.config import DataConfig
from pdjax.data.sources import RowError, row_turns
from pdjax.data.transforms import ablate_topic, drop_sync, with_pads
from pdjax.model.tokenizer import chat_prompt_ids
from pdjax.structure import ControlIds, PlanError, Segments, parse_response, segments_from_tokens, strip_plan

PLANNED_MODES = ("planned", "dense")


def prepared_features() -> Any:
    """The columns `Preparer` writes (fixed Arrow types, so the tokens load as one int32 buffer)."""
    import datasets

    return datasets.Features(
        {
            "row": datasets.Value("int64"),
            "tokens": datasets.List(datasets.Value("int32")),
            "prompt_len": datasets.Value("int32"),
            "block_ends": datasets.List(datasets.Value("int32")),
            "syncs": datasets.Value("int32"),
            "rule": datasets.Value("string"),
            "position": datasets.Value("int64"),
            "detail": datasets.Value("string"),
        }
    )


class Preparer:
    """Callable for ``Dataset.map(batched=True, with_indices=True)``: source rows to documents or skip reasons.

    ``block_ends`` are the positions of each span's `</async>` (where `[PAD]`s
    go); ``syncs`` counts the `<sync/>` tokens `drop_sync` will remove.
    """

    def __init__(self, tokenizer: Any, ids: ControlIds, config: DataConfig, fmt: str, row_offset: int):
        self.tokenizer = tokenizer
        self.ids = ids
        self.config = config
        self.fmt = fmt
        self.row_offset = row_offset

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        rows = [{k: batch[k][i] for k in keys} for i in range(len(indices))]
        out: dict[str, list] = {k: [] for k in prepared_features()}
        turns: list[tuple[str, str] | RowError] = []
        for row in rows:
            try:
                prompt, completion = row_turns(row, self.fmt, self.config)
                turns.append((prompt, ablate_topic(completion) if self.config.ablate_topic else completion))
            except RowError as err:
                turns.append(err)
        texts = [t[1] if isinstance(t, tuple) else "" for t in turns]
        completions = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for index, turn, completion_ids in zip(indices, turns, completions):
            doc = self._document(turn, completion_ids)
            out["row"].append(self.row_offset + index)
            for key, value in doc.items():
                out[key].append(value)
        return out

    def _document(self, turn: tuple[str, str] | RowError, completion_ids: list[int]) -> dict[str, Any]:
        skip = {"tokens": [], "prompt_len": 0, "block_ends": [], "syncs": 0}
        if isinstance(turn, RowError):
            return {**skip, "rule": turn.rule, "position": -1, "detail": turn.detail}
        cfg, ids = self.config, self.ids
        prompt_ids = chat_prompt_ids(self.tokenizer, turn[0], system=cfg.system_prompt, chat_template=cfg.chat_template)
        prompt_len = len(prompt_ids)
        tokens = np.asarray(prompt_ids + list(completion_ids) + [ids.eos], np.int32)
        try:
            parsed = parse_response(tokens, ids, prompt_len)
        except PlanError as err:
            return {**skip, "rule": err.rule, "position": err.position, "detail": str(err)}
        block_ends = [s.end for s in parsed.spans]
        syncs = sum(r.closer == "sync" for r in parsed.rounds)
        if cfg.mode in PLANNED_MODES:
            longest = len(tokens) + cfg.pad_max * len(block_ends) - (syncs if cfg.ablate_sync else 0)
        else:
            block_ends, syncs = [], 0
            tokens = strip_plan(tokens, ids, prompt_len)
            if cfg.eos_fill_length is not None:
                response = len(tokens) - prompt_len
                if response > cfg.eos_fill_length:
                    return {
                        **skip,
                        "rule": "response-too-long",
                        "position": prompt_len + cfg.eos_fill_length,
                        "detail": f"{response} response tokens > eos_fill_length {cfg.eos_fill_length}",
                    }
                tokens = np.concatenate([tokens, np.full(cfg.eos_fill_length - response, ids.eos, np.int32)])
            longest = len(tokens)
        if longest > cfg.row_length:
            extra = f" with up to {cfg.pad_max} [PAD] per span" if block_ends and cfg.pad_max else ""
            return {
                **skip,
                "rule": "too-long",
                "position": cfg.row_length,
                "detail": f"{longest} tokens{extra} > row_length {cfg.row_length}",
            }
        return {
            "tokens": tokens.tolist(),
            "prompt_len": prompt_len,
            "block_ends": block_ends,
            "syncs": syncs,
            "rule": "",
            "position": -1,
            "detail": "",
        }


def build_document(
    tokens: np.ndarray,
    prompt_len: int,
    block_ends: Sequence[int],
    pads: Sequence[int],
    ids: ControlIds,
    config: DataConfig,
) -> tuple[np.ndarray, Segments]:
    """One epoch's copy of a document: `[PAD]`s inserted, segment ids of the config's mode, sync ablation applied."""
    if len(block_ends):
        tokens = with_pads(tokens, block_ends, pads, ids.pad)
    seg = segments_from_tokens(tokens, prompt_len, ids, mode=config.mode)
    if config.ablate_sync and config.mode in PLANNED_MODES:
        tokens, seg = drop_sync(tokens, seg, prompt_len, ids)
    return np.asarray(tokens, np.int32), seg
