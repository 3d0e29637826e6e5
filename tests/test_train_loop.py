"""The trainer end to end on a tiny model: sharded training, 1-device agreement, exact resume, bad rows, export.

One 50-step run on one device is the reference ("straight") for the 2x4-mesh
run, the resume test and the export test; the three 1-device trainers share
one compiled step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from pdjax.model import DreamModel
from pdjax.structure import ControlIds, add_control_tokens
from pdjax.train.config import load_config
from pdjax.train.trainer import Trainer

STEPS = 50
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = "red green blue cyan black white tea milk bread rice fish soup one two three broken".split()
CONTENT = WORDS[:12]

# Malformed completions (the row's prompt says "broken" so the test can look for it in batches) and their rule.
BAD_ROWS = {
    "<promise>-<topic>red 2</topic><async>tea <async>milk</async></async>": "nested-async",
    "<promise>-<topic>red 2</topic>tea</async>": "stray-async-end",
    "<promise>-<topic>red</topic><async>tea milk</async>": "missing-promise-length",
    "<promise>-<topic>red 1</topic><promise>-<topic>blue 1</topic><async>tea</async>": "span-count-mismatch",
    "<promise>-<topic>red 1</topic><async>tea milk": "unclosed-async",  # <|im_end|> comes before any </async>
}


@functools.lru_cache(maxsize=None)
def tokenizer():
    """A WordLevel ChatML tokenizer over the test's words, digits split, plan tags added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", *"0123456789", "system", "user", "assistant", "question"]
    words += ["You", "are", "a", "helpful", ".", *WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", unk_token="[UNK]")
    tok.chat_template = CHATML
    add_control_tokens(tok)
    return tok


def completion(rng: random.Random) -> str:
    """A short planned answer whose spans repeat their topic word: learnable by a tiny model."""
    n = rng.randint(1, 2)
    topics = rng.sample(CONTENT, n)
    promises = "".join(f"<promise>-<topic>{t} {rng.randint(1, 3)}</topic>" for t in topics)
    spans = "".join("<async>" + " ".join([t] * rng.randint(1, 3)) + "</async>" for t in topics)
    return promises + spans


def write_rows(path: Path) -> str:
    rng = random.Random(0)
    rows = [{"prompt": f"question {rng.choice(CONTENT)}", "completion": completion(rng)} for _ in range(120)]
    for i, bad in enumerate(BAD_ROWS):
        rows.insert(7 + 11 * i, {"prompt": "question broken", "completion": bad})
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def make_config(workdir: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            f"data.source={write_rows(workdir / 'rows.jsonl')}",
            f"data.cache_dir={workdir / 'cache'}",
            f"data.skipped_path={workdir / name / 'skipped.jsonl'}",
            "data.row_length=48",
            "data.batch_size=8",
            "data.num_epochs=null",
            "data.num_threads=0",
            "data.pad_max=2",
            "data.shard_index=0",
            "data.shard_count=1",
            f"steps={STEPS}",
            "model.vocab_size=128",
            "optimizer.learning_rate=3e-3",
            "optimizer.warmup_steps=5",
            "log.every_steps=1",
            "log.progress=false",
            f"log.dir={workdir / name / 'logs'}",
            "mesh.data=1",
            *extra,
        ],
    )


class Recorder:
    """Per-step loss and a digest of every batch the trainer consumed."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.batches: dict[int, str] = {}
        self.seen: set[int] = set()

    def __call__(self, step, batch, metrics):
        self.losses[step] = float(metrics["loss"])
        self.batches[step] = hashlib.sha1(np.ascontiguousarray(batch["tokens"]).tobytes()).hexdigest()
        self.seen.update(np.unique(batch["tokens"]).tolist())


def host_params(trainer: Trainer) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(trainer.params()))


@pytest.fixture(scope="module")
def straight(workdir):
    """50 steps on one device, checkpointing every 25 steps."""
    cfg = make_config(workdir, "straight", f"checkpoint.dir={workdir / 'straight' / 'ckpt'}", "checkpoint.every_steps=25")
    trainer = Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], log=None)
    rec = Recorder()
    history = trainer.train(callback=rec)
    params = host_params(trainer)
    trainer.close()
    return cfg, trainer, rec, history, params


def test_loss_falls_and_2x4_mesh_matches_one_device(workdir, straight):
    _, one, rec1, _, params1 = straight
    cfg = make_config(workdir, "mesh", "mesh.fsdp=2", "mesh.tensor=4")
    trainer = Trainer.create(cfg, tokenizer=tokenizer(), log=None)
    assert dict(trainer.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    # parameters really are split over the mesh
    specs = {k: v.sharding.spec for k, v in trainer.state.params["layers"].items()}
    assert specs["q_proj"] == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    rec = Recorder()
    history = trainer.train(callback=rec)
    losses = np.array([rec.losses[s] for s in range(1, STEPS + 1)])
    assert losses[-10:].mean() < 0.6 * losses[:10].mean(), losses
    losses1 = np.array([rec1.losses[s] for s in range(1, STEPS + 1)])
    assert rec.batches == rec1.batches  # the same data order
    np.testing.assert_allclose(losses, losses1, rtol=2e-3, atol=2e-3)
    flat8 = jax.tree.leaves(host_params(trainer))
    flat1 = jax.tree.leaves(params1)
    for a, b in zip(flat8, flat1):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
    assert {"loss", "ar_loss", "diffusion_loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time_s"} <= set(history[-1])
    assert history[-1]["ar_loss"] > 0 and history[-1]["diffusion_loss"] > 0
    logged = [json.loads(line) for line in open(workdir / "mesh" / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert list((workdir / "mesh" / "logs" / "tensorboard").iterdir())
    trainer.close()


STOPPED = ("checkpoint.every_steps=10",)


@pytest.fixture(scope="module")
def stopped(workdir):
    """The same run stopped half-way (checkpoints at 10, 20 and the stop at 25)."""
    cfg = make_config(workdir, "stopped", f"checkpoint.dir={workdir / 'stopped' / 'ckpt'}", *STOPPED)
    first = Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], log=None)
    rec = Recorder()
    first.train(until=STEPS // 2, callback=rec)
    params = host_params(first)
    first.close()
    return cfg, rec, params


def test_resume_gives_identical_parameters_and_data_order(workdir, straight, stopped):
    _, _, rec_s, _, params_s = straight
    cfg, rec_a, _ = stopped
    second = Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], resume=True, log=None)
    assert int(second.state.step) == STEPS // 2
    rec_b = Recorder()
    second.train(callback=rec_b)
    second.close()
    assert {**rec_a.batches, **rec_b.batches} == rec_s.batches
    assert sorted(rec_b.batches) == list(range(STEPS // 2 + 1, STEPS + 1))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(host_params(second))[0], jax.tree.leaves(params_s)):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    np.testing.assert_array_equal([rec_b.losses[s] for s in rec_b.losses], [rec_s.losses[s] for s in rec_b.losses])


def test_malformed_rows_are_reported_with_reasons_and_skipped(workdir, straight):
    _, trainer, rec, _, _ = straight
    report = trainer.report
    bad_rules = {s.rule for s in report.skipped}
    assert set(BAD_ROWS.values()) <= bad_rules
    assert len(report.skipped) == len(BAD_ROWS)
    assert "skipped" in report.summary() and "nested-async" in report.summary()
    written = [json.loads(line) for line in open(workdir / "straight" / "skipped.jsonl")]
    assert sorted(r["rule"] for r in written) == sorted(BAD_ROWS.values())
    assert all(r["detail"] for r in written)
    # the bad rows never reach a batch: their prompt word never appears in one, other prompt words do
    assert tokenizer().convert_tokens_to_ids("broken") not in rec.seen
    assert tokenizer().convert_tokens_to_ids("question") in rec.seen


def test_export_of_a_checkpointed_step_loads_back(workdir, straight, stopped):
    """Any checkpointed step exports to a HF folder that load_pretrained reads back with that step's weights.

    Step 25 of the straight run was saved asynchronously while training went on (donating the state);
    its weights must equal those of the run that stopped at 25.
    """
    from pdjax.model.checkpoint import load_pretrained

    cfg, _, _, _, _ = straight
    _, _, params_25 = stopped
    trainer = Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], restore_step=25, with_data=False, log=None)
    assert int(trainer.state.step) == 25
    out = workdir / "export25"
    trainer.export(str(out))
    trainer.close()
    model = load_pretrained(str(out))
    assert isinstance(model, DreamModel)
    loaded = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(nnx.state(model))))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded)[0], jax.tree.leaves(params_25)):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    assert ControlIds.from_tokenizer(tokenizer()).mask < model.config.vocab_size


def test_a_fresh_run_refuses_a_used_checkpoint_dir(straight):
    cfg, _, _, _, _ = straight
    with pytest.raises(ValueError, match="--resume"):
        Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], log=None)
