"""pdjax on a real multi-process JAX cluster (N processes x 2 CPU devices on 127.0.0.1).

What a slice run needs, checked against a one-process run with the same global
batch and mesh shape: the hosts feed disjoint lanes of one global batch that does
not depend on the host count; losses match; orbax writes one checkpoint per save
from all hosts; ``--resume`` is bit-exact; a 2-host checkpoint resumes on 1 host
(and, slow-marked, a 4-host one on 2 and 1); ``--export`` writes one HF folder; a
SIGKILLed host makes the others fail fast with an error naming it; and
``pdjax.eval generate`` splits prompts over hosts with the one-process answers.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cluster import LocalCluster, cluster_env, cluster_fixture, finish, tails  # noqa: F401  (the fixture)
from test_data_toy import documents
from test_train_loop import completion, tokenizer

from pdjax.data import DataConfig, build_pipeline

PY = sys.executable
ROWS = 96  # 12 per lane of a batch of 8
STEPS = 6
TIMEOUT = 420  # any one cluster run; a healthy one takes well under a minute alone on 2 cores
MESH = ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")  # fsdp spans the two hosts, tensor stays inside one


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """Rows whose prompts carry their row number ("question 4 2"), and the tokenizer saved as a folder."""
    work = tmp_path_factory.mktemp("multihost")
    rng = random.Random(0)
    with open(work / "rows.jsonl", "w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"prompt": f"question {i}", "completion": completion(rng)}) + "\n")
    tokenizer().save_pretrained(work / "tokenizer")
    return work


def overrides(work: Path, name: str, *extra: str) -> list[str]:
    """A tiny training run of the test's data (run `name` keeps its logs and checkpoints under work/name)."""
    return [
        f"data.source={work / 'rows.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
        "data.row_length=48",
        "data.batch_size=8",
        "data.num_epochs=null",
        "data.num_threads=0",
        "data.pad_max=2",
        f"model.tokenizer={work / 'tokenizer'}",
        "model.vocab_size=128",
        f"steps={STEPS}",
        "optimizer.learning_rate=3e-3",
        "optimizer.warmup_steps=2",
        "log.every_steps=1",
        "log.progress=false",
        "log.tensorboard=false",
        f"log.dir={work / name / 'logs'}",
        f"checkpoint.dir={work / name / 'ckpt'}",
        "checkpoint.every_steps=3",
        *extra,
    ]


def run(work: Path, name: str, command: list[str], *, processes: int, devices: int, expect: int = 0) -> LocalCluster:
    """Run `command` to completion on a local cluster (killed and reaped however it ends)."""
    with LocalCluster(command, num_processes=processes, devices_per_process=devices, env=cluster_env(),
                      log_dir=str(work / name / "cluster"), cwd=str(Path(__file__).resolve().parents[1])) as c:
        finish(c, TIMEOUT, expect=expect)
    return c


def train(work: Path, name: str, *extra: str, processes: int, devices: int, flags: tuple[str, ...] = ()) -> LocalCluster:
    return run(work, name, [PY, "-m", "pdjax.train", *flags, *overrides(work, name, *extra)],
               processes=processes, devices=devices)


def losses(work: Path, name: str) -> dict[int, float]:
    """Step -> loss from the run's metrics.jsonl (written by process 0 only)."""
    return {r["step"]: r["loss"] for r in map(json.loads, open(work / name / "logs" / "metrics.jsonl"))}


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(f))
    return out


def resumable_copy(work: Path, source: str, name: str, keep: int) -> None:
    """A copy of run `source`'s checkpoints without those after step `keep` (as if it had stopped there)."""
    shutil.copytree(work / source / "ckpt", work / name / "ckpt")
    for step in (work / name / "ckpt").iterdir():
        if step.name.isdigit() and int(step.name) > keep:
            shutil.rmtree(step)


# ---- the input pipeline on the cluster ---------------------------------------------------------

def row_numbers(batch: dict[str, np.ndarray]) -> list[int]:
    """The source row of every document in a batch (read back from its prompt's digits)."""
    vocab = tokenizer().get_vocab()
    digits = {vocab[str(d)]: d for d in range(10)}
    out = []
    for b, _, where in documents(batch):
        toks = list(batch["tokens"][b, where])
        k = toks.index(vocab["question"]) + 1
        n = 0
        while toks[k] in digits:
            n, k = 10 * n + digits[toks[k]], k + 1
        out.append(n)
    return out


def test_global_batch_is_the_same_for_one_and_two_hosts(setup, cluster):
    """Each host reads its own half of the rows, every row is fed once an epoch, and on every mesh the
    trainer's global batch equals a one-host pipeline's batch, row for row."""
    work = setup
    probe = work / "probe"
    probe.mkdir()
    extra = ["data.num_epochs=1", "checkpoint.dir=null", "mesh.data=-1"]
    meshes = "2,2,1;1,4,1;1,2,2"  # data over hosts; fsdp over all four devices; fsdp over hosts x tensor inside
    c = cluster([PY, str(Path(__file__).with_name("multihost_probe.py")), probe, *overrides(work, "probe", *extra)],
                env={"PROBE_MESHES": meshes})
    finish(c, TIMEOUT)

    one_host = DataConfig(source=str(work / "rows.jsonl"), cache_dir=str(work / "cache"), row_length=48, batch_size=8,
                          num_epochs=1, num_threads=0, pad_max=2, shard_index=0, shard_count=1)
    it, report = build_pipeline(one_host, tokenizer(), log=None)
    reference = np.stack([b["tokens"] for b in it])
    for mesh in meshes.split(";"):
        assembled = np.load(probe / f"global_{mesh.replace(',', '_')}.npz")["tokens"]
        np.testing.assert_array_equal(assembled, reference, err_msg=f"mesh {mesh}")

    hosts = [np.load(probe / f"host{p}.npz") for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in hosts], axis=1), reference)
    assert [int(h["rows_read"]) for h in hosts] == [ROWS // 2, ROWS // 2]
    fed = [[n for t, d in zip(h["tokens"], h["doc_id"]) for n in row_numbers({"tokens": t, "doc_id": d})] for h in hosts]
    assert set(fed[0]).isdisjoint(fed[1])
    assert sorted(fed[0] + fed[1]) == list(range(ROWS))  # every row exactly once in the epoch
    assert str(hosts[0]["fingerprint"]) == str(hosts[1]["fingerprint"]) == report.fingerprint
