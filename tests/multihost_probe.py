"""Run on every process of a local cluster: what each host feeds and what the global batch becomes.

``python tests/multihost_probe.py OUT key=value ...`` builds the `Trainer` of the
overrides (``data.num_epochs=1``), then for every batch of the epoch: saves this
host's rows (``OUT/host{P}.npz``) and, on process 0, the global batch the
trainer assembles on each mesh named by ``PROBE_MESHES`` (``data,fsdp,tensor;...``),
read back from the devices (``OUT/global_{mesh}.npz``).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np


def main(out: str, overrides: list[str]) -> None:
    from pdjax.train.config import load_config
    from pdjax.train.trainer import Trainer, initialize_distributed

    cfg = load_config(None, overrides)
    initialize_distributed(cfg.distributed)
    import jax
    from jax.experimental import multihost_utils

    from pdjax.model import make_mesh

    trainer = Trainer.create(cfg, log=None)
    meshes = [tuple(int(x) for x in m.split(",")) for m in os.environ.get("PROBE_MESHES", "").split(";") if m]
    views = {m: dataclasses.replace(trainer, mesh=make_mesh(dict(zip(("data", "fsdp", "tensor"), m)))) for m in meshes}
    local: list[np.ndarray] = []
    doc_ids: list[np.ndarray] = []
    assembled: dict[tuple, list[np.ndarray]] = {m: [] for m in meshes}
    for _ in range(trainer.report.total_batches):
        host_batch = next(trainer.data)
        local.append(np.asarray(host_batch["tokens"]))
        doc_ids.append(np.asarray(host_batch["doc_id"]))
        for m, view in views.items():
            tokens = view.device_batch(host_batch)["tokens"]
            assembled[m].append(np.asarray(multihost_utils.process_allgather(tokens, tiled=True)))
    p = jax.process_index()
    np.savez(os.path.join(out, f"host{p}.npz"), tokens=np.stack(local), doc_id=np.stack(doc_ids), rows_read=trainer.report.rows_read,
             fingerprint=trainer.report.fingerprint)
    if p == 0:
        for m, batches in assembled.items():
            np.savez(os.path.join(out, "global_{}_{}_{}.npz".format(*m)), tokens=np.stack(batches))
    print(f"probe done on process {p}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
