"""`synthetic:` data sources: the seeded checkable data of `pdjax.synthetic`, generated on first use.

``source: "synthetic:DIR?seed=0&num_train=20000&num_heldout=500"`` names the folder
`pdjax.synthetic.build_dataset` writes (train.jsonl, heldout.jsonl, tokenizer/,
stats.json). `ensure_synthetic` builds it when it is missing, so that one
training command reproduces a model from a seed on a fresh machine; an existing
folder is reused only if its stats.json was built with the same settings.
Splits ``train`` and ``heldout`` read the matching JSONL file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

SCHEME = "synthetic:"
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Where the data lives and how `pdjax.synthetic.build_dataset` makes it."""

    path: str
    seed: int = 0
    num_train: int = 20000
    num_heldout: int = 500
    vocab_size: int | None = None  # None: pdjax.synthetic's default
    chatterbot: bool = False
    mix: tuple[tuple[str, float], ...] = ()  # shape shares; () is the task set's default mix
    tasks: str = "default"  # pdjax.synthetic task set: default, or paper (the paper's long-span shape)

    def file(self, split: str) -> str:
        """The JSONL file of `split` ("train" or "heldout")."""
        if split not in SPLITS:
            raise ValueError(f"a synthetic source has splits {SPLITS}, not {split!r}")
        return os.path.join(self.path, f"{split}.jsonl")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, "tokenizer")


def is_synthetic(source: str) -> bool:
    """True when `source` names a `synthetic:` data source."""
    return source.startswith(SCHEME)


def parse_spec(source: str) -> SyntheticSpec:
    """`SyntheticSpec` of ``synthetic:DIR?key=value&...`` (keys: the fields of SyntheticSpec and the shapes of the mix)."""
    from pdjax.synthetic import SHAPES

    if not is_synthetic(source):
        raise ValueError(f"not a synthetic source: {source!r}")
    path, _, query = source[len(SCHEME) :].partition("?")
    if not path:
        raise ValueError(f"{source!r}: name the data folder, e.g. synthetic:runs/data?seed=0")
    fields: dict[str, Any] = {"path": os.path.expanduser(path)}
    mix: dict[str, float] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{source!r}: {item!r} is not key=value")
        if key in ("seed", "num_train", "num_heldout", "vocab_size"):
            fields[key] = int(value)
        elif key == "tasks":
            from pdjax.synthetic.generate import TASK_SETS

            if value not in TASK_SETS:
                raise ValueError(f"{source!r}: tasks must be one of {TASK_SETS}, got {value!r}")
            fields[key] = value
        elif key == "chatterbot":
            fields[key] = value.lower() in ("1", "true", "yes")
        elif key in SHAPES:
            mix[key] = float(value)
        else:
            known = ["seed", "num_train", "num_heldout", "vocab_size", "chatterbot", "tasks", *SHAPES]
            raise ValueError(f"{source!r}: unknown key {key!r}; expected one of {known}")
    return SyntheticSpec(**fields, mix=tuple(sorted(mix.items())))


def _settings(spec: SyntheticSpec) -> dict[str, Any]:
    """What must match between a spec and a built folder's stats.json."""
    from pdjax.synthetic.dataset import DEFAULT_VOCAB_SIZE
    from pdjax.synthetic.generate import default_mix

    mix = dict(default_mix(spec.tasks))
    mix.update(dict(spec.mix))
    tasks = {"tasks": spec.tasks} if spec.tasks != "default" else {}  # default folders' stamps stay valid
    return {
        "seed": spec.seed,
        "num_train": spec.num_train,
        "num_heldout": spec.num_heldout,
        "vocab_size": spec.vocab_size or DEFAULT_VOCAB_SIZE,
        "chatterbot": spec.chatterbot,
        "mix": mix,
        **tasks,
    }


STAMP = "source.json"


def ensure_synthetic(source: str, log: Any = print) -> SyntheticSpec:
    """Build the folder of a ``synthetic:`` source if it does not exist yet; return its spec.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted build leaves nothing half-made. An existing folder built with other
    settings is an error (delete it or point the source elsewhere).
    """
    spec = parse_spec(source)
    wanted = _settings(spec)
    stamp = os.path.join(spec.path, STAMP)
    if os.path.exists(stamp):
        with open(stamp) as f:
            built = json.load(f)
        if built != wanted:
            raise ValueError(
                f"{spec.path} holds synthetic data built with {built}, but the source asks for {wanted}; "
                "delete the folder or choose another path"
            )
        return spec
    if os.path.exists(spec.path) and os.listdir(spec.path):
        raise ValueError(f"{spec.path} exists but holds no {STAMP}: not a folder built by a synthetic: source")

    from pdjax.synthetic import build_dataset

    if log is not None:
        log(f"building the synthetic data set {wanted} into {spec.path} (once)")
    parent = os.path.dirname(os.path.abspath(spec.path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        build_dataset(
            tmp, spec.seed, spec.num_train, spec.num_heldout,
            vocab_size=wanted["vocab_size"], mix=wanted["mix"], chatterbot=spec.chatterbot, tasks=spec.tasks,
            log=log,
        )  # fmt: skip
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump(wanted, f, indent=2)
        if os.path.isdir(spec.path):
            os.rmdir(spec.path)  # empty (checked above)
        os.replace(tmp, spec.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec
