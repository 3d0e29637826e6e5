"""What a model folder says about how to decode it: the mode it was trained for and its response budget.

pdjax records both in the folder's Hugging Face ``generation_config.json``: the standard
``max_new_tokens`` (a diffusion model's number of masks, the fixed length its answers were
filled to in training) and ``pdjax_mode`` (``pd``, ``ar`` or ``diffusion``). Training exports
write them (`write_generation_config`); folders without them (e.g. Dream-7B) decode with the
CLI's defaults and no mode check. The shipped default models live in
``pdjax/assets/default_model/{pd,ar,diffusion}`` (`default_model_path`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
from typing import Any

GENERATION_CONFIG = "generation_config.json"
MODE_KEY = "pdjax_mode"
DATA_MODE_TO_DECODE_MODE = {"planned": "pd", "dense": "pd", "ar_only": "ar", "diffusion_only": "diffusion"}
DEFAULT_DIFFUSION_MASKS = 256  # Dream's fixed-length generation without a model-given length; cheap enough on CPU


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The decoding facts a model folder records (None: not recorded)."""

    mode: str | None = None
    max_new_tokens: int | None = None

    @property
    def diffusion_masks(self) -> int:
        """Masks a diffusion sampler decodes when the user names none: the model's own count, else the default."""
        return self.max_new_tokens or DEFAULT_DIFFUSION_MASKS


def default_model_path(mode: str) -> str:
    """The shipped default model of `mode` (pdjax/assets/default_model/{pd,ar,diffusion})."""
    return str(importlib.resources.files("pdjax").joinpath("assets", "default_model", mode))


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """`ModelInfo` from the folder's generation_config.json; empty when the file or its keys are absent."""
    file = os.path.join(os.fspath(path), GENERATION_CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return ModelInfo()
    if not isinstance(data, dict):
        return ModelInfo()
    mode = data.get(MODE_KEY)
    new = data.get("max_new_tokens")
    return ModelInfo(mode=mode if mode in DATA_MODE_TO_DECODE_MODE.values() else None,
                     max_new_tokens=new if isinstance(new, int) and new > 0 else None)


def write_generation_config(path: str | os.PathLike, mode: str, max_new_tokens: int | None = None) -> None:
    """Record the decode mode (and a diffusion model's mask count) in the folder's generation_config.json.

    Keys already in the file are kept; ``mode`` is a decode mode or a training data mode
    (``planned``, ``dense``, ``ar_only``, ``diffusion_only``).
    """
    mode = DATA_MODE_TO_DECODE_MODE.get(mode, mode)
    if mode not in DATA_MODE_TO_DECODE_MODE.values():
        raise ValueError(f"unknown mode {mode!r}")
    file = os.path.join(os.fspath(path), GENERATION_CONFIG)
    data: dict[str, Any] = {}
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    data[MODE_KEY] = mode
    if max_new_tokens is not None:
        data["max_new_tokens"] = int(max_new_tokens)
    os.makedirs(os.fspath(path), exist_ok=True)
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def weights_sha256(folder: str) -> str:
    """SHA-256 of a folder's model.safetensors: which weights a measurement was taken on."""
    digest = hashlib.sha256()
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
