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
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cluster import HEARTBEAT_S, LocalCluster, cluster_env, cluster_fixture, finish, tails  # noqa: F401  (the fixture)
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


# ---- training, checkpoints, resume, export -----------------------------------------------------

@pytest.fixture(scope="module")
def one_host(setup) -> Path:
    """The reference: one process with all four devices, the same mesh (fsdp 2 x tensor 2) and global batch."""
    train(setup, "one", *MESH, processes=1, devices=4)
    return setup


@pytest.fixture(scope="module")
def two_hosts(setup) -> Path:
    """Two processes x 2 devices, checkpoints at steps 3 and 6, the final weights exported."""
    train(setup, "two", *MESH, f"checkpoint.export_dir={setup / 'two' / 'hf'}", processes=2, devices=2)
    return setup


def test_two_hosts_train_with_the_losses_of_one_host(one_host, two_hosts):
    one, two = losses(one_host, "one"), losses(two_hosts, "two")
    assert sorted(two) == list(range(1, STEPS + 1)) and sorted(one) == sorted(two)
    a, b = np.array([one[s] for s in sorted(one)]), np.array([two[s] for s in sorted(two)])
    # The same rows on the same mesh shape: XLA's collectives over gloo reduce in the same order as in one process.
    np.testing.assert_array_equal(b, a)


def test_orbax_writes_one_checkpoint_per_save_from_all_hosts(two_hosts):
    ckpt = two_hosts / "two" / "ckpt"
    steps = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("logs"))
    assert steps == ["3", "6"], steps  # no per-host copies, no unfinished temporaries
    for step in steps:
        items = {p.name for p in (ckpt / step).iterdir() if p.is_dir()}
        assert {"state", "data", "meta"} <= items
        data_files = sorted(p.name for p in (ckpt / step / "data").iterdir())
        assert len([f for f in data_files if "process_0" in f]) == 1 and len([f for f in data_files if "process_1" in f]) == 1, data_files
        meta = json.loads(next((ckpt / step / "meta").glob("*")).read_text())
        assert len(meta["data_fingerprints"]) == 2 and len(set(meta["data_fingerprints"])) == 1


def test_resume_on_the_cluster_is_bit_exact(two_hosts):
    work = two_hosts
    resumable_copy(work, "two", "resumed", keep=3)
    train(work, "resumed", *MESH, f"checkpoint.export_dir={work / 'resumed' / 'hf'}", processes=2, devices=2,
          flags=("--resume",))
    straight, resumed = losses(work, "two"), losses(work, "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    a, b = weights(work / "two" / "hf"), weights(work / "resumed" / "hf")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_export_from_a_multihost_checkpoint_writes_one_hf_folder(two_hosts):
    work = two_hosts
    out = work / "exported"
    run(work, "export", [PY, "-m", "pdjax.train", "--export", str(out), *overrides(work, "two", *MESH)],
        processes=2, devices=2)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(work.glob("exported?*"))  # one folder, written once (by process 0)
    a, b = weights(work / "two" / "hf"), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_a_one_host_checkpoint_resumes_on_two_hosts(one_host):
    """Elastic restart upwards: step 3 of the 1-host run continues on two hosts, losses bit for bit."""
    work = one_host
    resumable_copy(work, "one", "elastic2", keep=3)
    train(work, "elastic2", *MESH, processes=2, devices=2, flags=("--resume",))
    straight, resumed = losses(work, "one"), losses(work, "elastic2")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


def test_a_two_host_checkpoint_resumes_on_one_host(two_hosts):
    """Elastic restart: step 3 of the 2-host run continues on one process with the same devices and mesh, losses
    bit for bit (the global batches and the mesh are the same)."""
    work = two_hosts
    resumable_copy(work, "two", "elastic1", keep=3)
    train(work, "elastic1", *MESH, processes=1, devices=4, flags=("--resume",))
    straight, resumed = losses(work, "two"), losses(work, "elastic1")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


# ---- preemption and failures -------------------------------------------------------------------

LONG = ("steps=1000", "checkpoint.every_steps=1000", "log.every_steps=1000")  # runs until stopped


def start_long(cluster, work: Path, name: str):
    """A 2-host run that would take many minutes, once its first step has run on both hosts."""
    c = cluster([PY, "-m", "pdjax.train", *overrides(work, name, *MESH, *LONG)], name=name)
    try:
        c.wait_for(0, r"train step ready", timeout=TIMEOUT)  # the step is a collective: both hosts are in the loop
    except TimeoutError as e:
        pytest.fail(f"{e}\n{tails(c)}")
    return c


def data_positions(work: Path, name: str, step: int) -> list[dict]:
    folder = work / name / "ckpt" / str(step) / "data"
    return [json.loads(f.read_text()) for f in sorted(folder.glob("process_*.json"))]


def stopped_step(work: Path, name: str) -> int:
    steps = sorted(int(p.name) for p in (work / name / "ckpt").iterdir() if p.name.isdigit())
    assert len(steps) == 1, steps  # only the checkpoint of the stop (the periodic one is at 1000)
    return steps[0]


@pytest.mark.parametrize("who", ["all", "one"])
def test_sigterm_stops_every_host_at_the_same_step_saves_it_and_exits_0(setup, cluster, who):
    """A maintenance event signals every host; a single host's notice stops the others at that step too."""
    work = setup
    name = f"sigterm_{who}"
    c = start_long(cluster, work, name)
    for p in (range(2) if who == "all" else [1]):
        c.signal(p, 15)
    finish(c, 120)  # all exit 0 well before the 1000 steps; nothing hangs in a collective
    step = stopped_step(work, name)
    assert 1 <= step < 1000
    assert data_positions(work, name, step) == [{"next_index": step}] * 2  # both hosts fed exactly `step` batches
    assert re.search(rf"stopped by .* at step {step}\b", c.output(0)), c.output(0)[-2000:]
    assert max(losses(work, name)) == step


def test_a_killed_host_makes_the_others_fail_fast_with_a_clear_error(setup, cluster):
    work = setup
    c = start_long(cluster, work, "sigkill")
    killed = time.monotonic()
    c.signal(1, 9)
    codes = finish(c, 6 * HEARTBEAT_S + 30, expect=None)  # a hang would run into this bound and fail the test
    waited = time.monotonic() - killed
    assert codes[1] == -9 and codes[0] != 0, codes
    out = c.output(0)
    assert re.search(r"stopped sending heartbeats|heartbeat timeout|unhealthy", out), out[-3000:]
    assert waited < 3 * HEARTBEAT_S + 30, waited


# ---- evaluation --------------------------------------------------------------------------------

PROMPTS = [f"question {i}" for i in (3, 14, 15, 92, 65, 35, 8)]  # an odd count: the hosts get 4 and 3


def generate(work: Path, name: str, model: Path, processes: int) -> list[dict]:
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS))
    out = work / name / "answers.json"
    run(work, name, [PY, "-m", "pdjax.eval", "generate", "--mode", "pd", "--model", str(model), "--prompts",
                     str(prompts), "--output", str(out), "--max_length", "64", "--temperature", "0"],
        processes=processes, devices=1)
    return json.loads(out.read_text())


def test_eval_generate_splits_prompts_over_hosts_with_the_answers_of_one_host(two_hosts):
    work = two_hosts
    model = work / "two" / "hf"  # the 2-host run's export: a small model that answers something
    two = generate(work, "eval2", model, processes=2)
    one = generate(work, "eval1", model, processes=1)
    assert sorted(r["instruction"] for r in two) == sorted(PROMPTS)  # each prompt once
    parts = sorted((work / "eval2" / "answers.json.parts").glob("shard*"))
    per_host = [sum(1 for f in parts if f"shard{p:03d}-of002" in f.name for _ in open(f)) for p in range(2)]
    assert per_host == [4, 3], (parts, per_host)  # every other prompt on each host
    assert len({r["output"] for r in one}) > 1  # the prompts get different answers: a mix-up would show
    assert {r["instruction"]: r["output"] for r in two} == {r["instruction"]: r["output"] for r in one}


# ---- four hosts (slow) -------------------------------------------------------------------------

MESH8 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")  # on 4 hosts: data and fsdp span hosts, tensor inside one


@pytest.mark.slow
def test_four_hosts_train_like_one_and_resume_on_two_and_on_one(setup):
    """4 hosts x 2 devices match 1 host x 8 devices; their step-3 checkpoint continues on 2 hosts x 4 and 1 x 8."""
    work = setup
    train(work, "four", *MESH8, processes=4, devices=2)
    train(work, "one8", *MESH8, processes=1, devices=8)
    four, one = losses(work, "four"), losses(work, "one8")
    assert sorted(four) == list(range(1, STEPS + 1))
    assert [four[s] for s in sorted(four)] == [one[s] for s in sorted(four)]
    assert len(data_positions(work, "four", 3)) == 4
    for hosts, devices in ((2, 4), (1, 8)):
        name = f"four_on_{hosts}"
        resumable_copy(work, "four", name, keep=3)
        train(work, name, *MESH8, processes=hosts, devices=devices, flags=("--resume",))
        resumed = losses(work, name)
        assert sorted(resumed) == [4, 5, 6]
        assert [resumed[s] for s in (4, 5, 6)] == [four[s] for s in (4, 5, 6)]
