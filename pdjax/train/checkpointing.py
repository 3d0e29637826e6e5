"""Orbax checkpoints of a run: train state (step, params, optimizer, RNG), data-iterator state, metadata.

One `orbax.checkpoint.CheckpointManager` with three items per step:
``state`` (the `TrainState` pytree, saved asynchronously, restored straight
into its shardings), ``data`` (the grain iterator, one JSON file per host) and
``meta`` (JSON: the config, the data fingerprint, the trainable kind). Paths
may be local or anything orbax's epath accepts (``gs://bucket/run``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE, DATA, META = "state", "data", "meta"


def _absolute(directory: str) -> str:
    """orbax wants absolute paths; URLs (gs://...) pass unchanged."""
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the last ``max_to_keep``."""

    def __init__(
        self,
        directory: str,
        *,
        every_steps: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        cleanup_tmp: bool = False,
    ):
        """``cleanup_tmp``: remove the unfinished saves an aborted run left (only the run that writes may)."""
        import grain.checkpoint  # noqa: F401  (registers grain's handler with orbax)

        self.directory = _absolute(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, META))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving (asynchronously when enabled) if `step` is a multiple of ``every_steps`` or `force`.

        Returns whether a save started. (The step count decides, not orbax's policy, which would
        also save the first step of a run.)
        """
        import grain.checkpoint

        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: grain.checkpoint.CheckpointSave(data_iterator),
                META: ocp.args.JsonSave(dict(meta)),
            }
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`; the state lands in `abstract_state`'s shardings, the iterator is set in place."""
        import grain.checkpoint

        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        elastic = None if data_iterator is None else self._other_host_count_data_state(step)
        if data_iterator is not None and elastic is None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if elastic is not None:
            data_iterator.set_state(elastic)
        return restored[STATE], dict(restored[META])

    def _other_host_count_data_state(self, step: int) -> dict[str, Any] | None:
        """The iterator state of a checkpoint saved by another number of hosts (None: saved by as many as now).

        grain writes one state per host; pdjax's pipeline makes them all the batch index, so any host
        count may take it over (elastic restart), provided the saved states agree.
        """
        folder = epath.Path(self.directory) / str(step) / DATA
        if (folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
            return None
        states = [json.loads(f.read_text()) for f in sorted(folder.glob("process_*-of-*.json"))]
        if not states:
            raise ValueError(f"{folder} holds no data-iterator state")
        if any(s != states[0] for s in states):
            raise ValueError(f"the {len(states)} hosts that saved {folder} stood at different data positions; "
                             f"resume on {len(states)} hosts")
        return states[0]

    def read_meta(self, step: int) -> dict[str, Any]:
        """Only the metadata of `step` (cheap: no arrays are read)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    def wait(self) -> None:
        """Block until pending asynchronous saves are on storage."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete (or abstract) pytree, for restoring."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
