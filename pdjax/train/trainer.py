"""The training run: mesh, model, data, optimizer, checkpoints and the loop, from one `TrainConfig`.

``Trainer.create(cfg)`` builds everything sharded from the start (parameters
and optimizer state are created, loaded or restored directly into their
shardings); ``trainer.train()`` runs the loop; ``trainer.export(path)`` writes
a Hugging Face checkpoint (LoRA folded in). `train(cfg)` does all three.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdjax.data import BATCH_KEYS, DataReport, build_pipeline, prepare_source
from pdjax.model import DreamConfig, DreamModel, abstract_model, init_model, make_mesh, state_shardings
from pdjax.model.tokenizer import load_tokenizer
from pdjax.structure import ControlIds, add_control_tokens
from pdjax.train import lora as lora_lib
from pdjax.train.checkpointing import Checkpointer
from pdjax.train.config import TrainConfig, config_dict
from pdjax.train.metrics import MetricsLog, Throughput, flops_per_token, peak_flops
from pdjax.train.optimizer import learning_rate_schedule, make_optimizer
from pdjax.train.preemption import Preemption, mark_start
from pdjax.train.step import StepOptions, TrainState, batch_sharding, jit_train_step, make_train_step, state_layout

# The jitted steps of recent setups, reused by a new Trainer with the same model, optimizer, mesh and batch
# shape (a resumed run in the same process, a notebook re-running a cell): no second compilation.
_STEP_CACHE: dict[Any, Callable] = {}
_STEP_CACHE_SIZE = 4

# Environment variables that mean "this process is one of several hosts".
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def is_multihost_launch(env: Mapping[str, str] = os.environ) -> bool:
    """True when the environment says this process is one host of several (TPU slice, SLURM, MPI, explicit)."""
    if any(env.get(k) for k in _MULTIHOST_ENV):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def initialize_distributed(mode: str) -> bool:
    """Call `jax.distributed.initialize()` for ``on``, or for ``auto`` on a multi-host launch; True if it ran."""
    if mode == "off" or (mode == "auto" and not is_multihost_launch()):
        return False
    if jax.distributed.is_initialized():
        return True
    # TPU slices, SLURM, Open MPI and Kubernetes are detected by jax itself; a plain launch can give
    # JAX_COORDINATOR_ADDRESS plus JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    # JAX_HEARTBEAT_TIMEOUT_SECONDS: how soon the others stop (with an error naming it) after a host dies.
    names = (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"),
             ("heartbeat_timeout_seconds", "JAX_HEARTBEAT_TIMEOUT_SECONDS"))
    explicit = {k: int(os.environ[e]) for k, e in names if os.environ.get(e)}
    jax.distributed.initialize(**explicit)
    return True


def presets() -> list[str]:
    """Names of the `DreamConfig` preset constructors (``tiny``, ``dream_7b``, ...)."""
    return sorted(
        name
        for name, attr in vars(DreamConfig).items()
        if isinstance(attr, classmethod) and name != "from_hf" and not name.startswith("_")
    )


def model_numerics(cfg: TrainConfig) -> dict[str, Any]:
    """The `DreamConfig` fields a run sets on any checkpoint or preset: dtypes, remat and attention."""
    m = cfg.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention_impl=m.attention_impl,
                attention_options=tuple(sorted(m.attention_options.items())))


def model_config(cfg: TrainConfig, tokenizer: Any) -> DreamConfig:
    """The `DreamConfig` of the run: a checkpoint's config.json, else a preset, with the run's numerics."""
    m = cfg.model
    numerics = model_numerics(cfg)
    vocab_needed = len(tokenizer)
    if m.checkpoint is not None:
        config = DreamConfig.from_hf(os.path.expanduser(m.checkpoint), **numerics)
        if vocab_needed > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_needed} tokens but {m.checkpoint} only {config.vocab_size} embeddings"
            )
        return config
    if m.preset not in presets():
        raise ValueError(f"unknown model.preset {m.preset!r}; choose from {presets()}")
    fields = {f.name for f in dataclasses.fields(DreamConfig)}
    for name in m.preset_args:
        if name not in fields or name in numerics or name == "vocab_size":
            close = difflib.get_close_matches(name, sorted(fields - set(numerics) - {"vocab_size", "hf_source"}), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"model.preset_args: {name!r} is not a shape field of DreamConfig{hint}")
    base = getattr(DreamConfig, m.preset)(**m.preset_args)
    vocab = m.vocab_size or base.vocab_size
    if vocab_needed > vocab:
        if m.vocab_size is not None:
            raise ValueError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer ({vocab_needed} tokens)")
        vocab = -(-vocab_needed // 128) * 128
    return getattr(DreamConfig, m.preset)(**{**m.preset_args, "vocab_size": vocab, **numerics})


def train_step_for(cfg: TrainConfig, config: DreamConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, total_steps: int, mesh: Mesh, state_shardings_: TrainState,
                   frozen_shardings: Any, mask_id: int) -> Callable:
    """The jitted train step of a run (`jit_train_step`), reused from `_STEP_CACHE` for the same setup."""
    lora_cfg = cfg.lora if cfg.lora.enabled else None
    options = StepOptions(cfg.loss_config, mask_id=mask_id, grad_accum=cfg.grad_accum, lora=lora_cfg)
    batch_shape = (cfg.data.batch_size, cfg.data.row_length)
    batch_shardings = {k: batch_sharding(mesh, config.axis_rules, batch_shape) for k in BATCH_KEYS}
    key = (config, cfg.optimizer, total_steps, options, mesh, batch_shape)
    step_fn = _STEP_CACHE.get(key)
    if step_fn is None:
        step_fn = jit_train_step(
            make_train_step(graphdef, tx, schedule, options), state_shardings_, frozen_shardings, batch_shardings, mesh
        )
        while len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = step_fn
    return step_fn


def abstract_train_step(cfg: TrainConfig, config: DreamConfig, mesh: Mesh, mask_id: int,
                        total_steps: int) -> tuple[Callable, tuple[Any, Any, dict[str, jax.ShapeDtypeStruct]]]:
    """The jitted step `Trainer.create` builds for `cfg` on `mesh`, and abstract arguments for it (state, frozen
    weights, batch) with their shardings: ``step.lower(*args).compile()`` compiles exactly the step a run makes,
    with no weights read or made (`pdjax.aot train`)."""
    rules = config.axis_rules
    lora_cfg = cfg.lora if cfg.lora.enabled else None
    graphdef, params_state, rest = nnx.split(abstract_model(config, mesh), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state; the train step only carries parameters")
    base = nnx.to_pure_dict(params_state)
    base_shardings = nnx.to_pure_dict(state_shardings(params_state, mesh, rules))
    schedule = learning_rate_schedule(cfg.optimizer, total_steps)
    tx = make_optimizer(cfg.optimizer, total_steps)
    abstract_state, state_shardings_, frozen_shardings = state_layout(base, base_shardings, tx, mesh, rules, lora_cfg)
    frozen = {"base": base} if lora_cfg is not None else {}
    step_fn = train_step_for(cfg, config, graphdef, tx, schedule, total_steps, mesh, state_shardings_,
                             frozen_shardings, mask_id)
    shape = (cfg.data.batch_size, cfg.data.row_length)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, rules, shape)) for k in BATCH_KEYS}
    return step_fn.jitted, (abstract_state, frozen, batch)


@dataclasses.dataclass(frozen=True)
class Stopped:
    """A run ended early by a signal or a preemption notice: why, at which step, where that step is saved."""

    reason: str  # SIGTERM, SIGINT or "a preemption notice"
    step: int
    checkpoint_dir: str | None  # None: no checkpoint.dir, nothing was saved


@dataclasses.dataclass
class Trainer:
    """A ready-to-run training setup; build it with `Trainer.create`."""

    cfg: TrainConfig
    mesh: Mesh
    config: DreamConfig
    tokenizer: Any
    ids: ControlIds
    graphdef: nnx.GraphDef
    state: TrainState
    frozen: dict[str, Any]
    state_shardings: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step_fn: Callable
    total_steps: int
    data: Any | None
    report: DataReport | None
    checkpointer: Checkpointer | None
    log: Callable[[str], None] = print
    stopped: Stopped | None = None  # set by `train` when a signal or preemption notice ended it early

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        cfg: TrainConfig,
        *,
        tokenizer: Any = None,
        devices: Sequence[jax.Device] | None = None,
        resume: bool = False,
        restore_step: int | None = None,
        with_data: bool = True,
        log: Callable[[str], None] | None = print,
    ) -> "Trainer":
        """Build mesh, model, data pipeline, optimizer and step; restore the latest checkpoint when `resume`.

        ``restore_step`` restores that step instead of the latest (export of any step).
        ``with_data=False`` skips the data pipeline (exporting needs none).
        """
        log = log or (lambda _msg: None)
        initialize_distributed(cfg.distributed)
        prepare_source(cfg.data, log=log)  # a generated (synthetic:) source writes its data and tokenizer first
        if tokenizer is None:
            source = cfg.model.tokenizer or cfg.model.checkpoint
            if source is None:
                raise ValueError("set model.tokenizer (a preset has no tokenizer of its own)")
            tokenizer = load_tokenizer(os.path.expanduser(source))
        added = add_control_tokens(tokenizer)  # as the released trainer does; Dream's padded vocabulary has room
        if added:
            log(f"added {added} control token(s) of the plan language to the tokenizer")
        ids = ControlIds.from_tokenizer(tokenizer)
        config = model_config(cfg, tokenizer)
        mesh = make_mesh(cfg.mesh.sizes(), devices)
        rules = config.axis_rules
        lora_cfg = cfg.lora if cfg.lora.enabled else None

        data, report = None, None
        if with_data:
            data, report = build_pipeline(cfg.data, tokenizer, log=log)
        total_steps = cfg.steps or (report.total_batches if report is not None else None)
        if total_steps is None:
            raise ValueError("set steps: the data pipeline repeats forever (data.num_epochs is null)")
        if report is not None and report.total_batches is not None and report.total_batches < total_steps:
            log(f"note: the data yields {report.total_batches} batches, fewer than steps={total_steps}; training stops there")
        schedule = learning_rate_schedule(cfg.optimizer, total_steps)
        tx = make_optimizer(cfg.optimizer, total_steps)

        checkpointer = None
        if cfg.checkpoint.dir is not None:
            checkpointer = Checkpointer(
                cfg.checkpoint.dir,
                every_steps=cfg.checkpoint.every_steps,
                max_to_keep=cfg.checkpoint.max_to_keep,
                async_save=cfg.checkpoint.async_save,
                cleanup_tmp=with_data,  # a training run; an export may read while a run writes
            )
        if restore_step is None and resume and checkpointer is not None:
            restore_step = checkpointer.latest_step()
            if restore_step is None:
                log(f"no checkpoint in {checkpointer.directory} yet: starting at step 0")
        elif restore_step is None and checkpointer is not None and checkpointer.latest_step() is not None:
            raise ValueError(
                f"{checkpointer.directory} already holds checkpoints (steps {checkpointer.all_steps()}); "
                "resume with --resume (resume=True) or point checkpoint.dir somewhere new"
            )
        restoring = restore_step is not None
        if restoring and checkpointer is None:
            raise ValueError("restoring needs checkpoint.dir")
        if with_data:
            mark_start(restore_step or 0)  # a preemption notice during the setup below lands on a step

        # Base weights: loaded, initialised or (when a full fine-tune is restored) only abstract.
        need_base_values = lora_cfg is not None or not restoring
        if cfg.model.checkpoint is not None and need_base_values:
            from pdjax.model.checkpoint import load_pretrained

            model = load_pretrained(
                os.path.expanduser(cfg.model.checkpoint),
                mesh=mesh,
                dtype=cfg.model.dtype,
                param_dtype=cfg.model.param_dtype,
                remat=cfg.model.remat,
                attention_impl=cfg.model.attention_impl,
                attention_options=config.attention_options,
            )
            config = model.config
        elif need_base_values:
            model = init_model(config, mesh, seed=cfg.seed)
        else:
            model = abstract_model(config, mesh)
        graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("the model holds non-parameter state; the train step only carries parameters")
        base = nnx.to_pure_dict(params_state)
        base_shardings = nnx.to_pure_dict(state_shardings(params_state, mesh, rules))
        del model, params_state

        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_state, state_shardings_, frozen_shardings = state_layout(base, base_shardings, tx, mesh, rules, lora_cfg)
        frozen = {"base": base} if lora_cfg is not None else {}
        if restoring:
            state, meta = checkpointer.restore(restore_step, abstract_state, data)
            if report is not None:
                saved_all = meta.get("data_fingerprints") or [None]  # saved by fewer hosts: all hosts' agree
                saved = saved_all[jax.process_index() if jax.process_index() < len(saved_all) else 0]
                if saved not in (None, report.fingerprint):
                    raise ValueError(
                        "the data differs from the checkpoint's (config, source or host count changed): "
                        f"host {jax.process_index()} fingerprint {report.fingerprint} vs {saved}"
                    )
            log(f"restored step {int(state.step)} from {checkpointer.directory}")
        else:
            key = jax.random.key(cfg.seed)
            with jax.set_mesh(mesh):
                if lora_cfg is not None:
                    init = jax.jit(lambda b, k: lora_lib.init_lora(b, lora_cfg, k), out_shardings=state_shardings_.params)
                    params = init(base, jax.random.fold_in(key, 1))
                else:
                    params = base
                opt_state = jax.jit(tx.init, out_shardings=state_shardings_.opt_state)(params)
            state = TrainState(
                jax.device_put(jnp.zeros((), jnp.int32), replicated),
                params,
                opt_state,
                jax.device_put(jax.random.key_data(jax.random.fold_in(key, 2)), replicated),
            )
        if lora_cfg is None:
            del base  # the state owns the parameters now

        step_fn = train_step_for(cfg, config, graphdef, tx, schedule, total_steps, mesh, state_shardings_,
                                 frozen_shardings, ids.mask)
        return cls(
            cfg=cfg,
            mesh=mesh,
            config=config,
            tokenizer=tokenizer,
            ids=ids,
            graphdef=graphdef,
            state=state,
            frozen=frozen,
            state_shardings=state_shardings_,
            tx=tx,
            schedule=schedule,
            step_fn=step_fn,
            total_steps=total_steps,
            data=data,
            report=report,
            checkpointer=checkpointer,
            log=log,
        )

    # ---- the loop ---------------------------------------------------------------------------

    def device_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows -> global arrays sharded over the mesh's batch axes."""
        shape = (self.cfg.data.batch_size, self.cfg.data.row_length)
        rules = self.config.axis_rules
        out = {}
        for k in BATCH_KEYS:
            local = np.asarray(host_batch[k], np.int32)
            out[k] = jax.make_array_from_process_local_data(batch_sharding(self.mesh, rules, shape), local, shape)
        return out

    def meta(self) -> dict[str, Any]:
        """Run metadata saved with every checkpoint: the config and each host's data fingerprint."""
        return {"config": config_dict(self.cfg), "data_fingerprints": self._fingerprints, "lora": self.cfg.lora.enabled}

    @functools.cached_property
    def _fingerprints(self) -> list[str] | None:
        """Every host's data fingerprint, in process order (each host reads its own shard)."""
        if self.report is None:
            return None
        if jax.process_count() == 1:
            return [self.report.fingerprint]
        from jax.experimental import multihost_utils

        mine = np.frombuffer(self.report.fingerprint.encode("ascii"), np.uint8)  # bytes: no int64 without x64
        everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
        return [row.astype(np.uint8).tobytes().decode("ascii") for row in everyone]

    def train(
        self,
        *,
        until: int | None = None,
        callback: Callable[[int, Mapping[str, np.ndarray], dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run from the current step to `total_steps` (or `until`, or the end of the data); return the logged metrics.

        Stopping early (``until``) checkpoints the step reached, as an interrupted
        run would. ``callback(step, host_batch, metrics)`` runs after every step
        (metrics are device arrays; reading them blocks).

        SIGTERM / SIGINT (or a preemption notice from another host) stop the loop
        after the step in flight, at a step all hosts agree on; that step is
        checkpointed with the data iterator and `self.stopped` says so
        (`pdjax.train.preemption`).
        """
        if self.data is None:
            raise ValueError("this Trainer was created without data")
        cfg = self.cfg
        main = jax.process_index() == 0
        start = int(self.state.step)
        self.stopped = None
        log_dir = cfg.log.dir
        if log_dir is None and cfg.checkpoint.dir is not None and "://" not in cfg.checkpoint.dir:
            log_dir = os.path.join(cfg.checkpoint.dir, "logs")
        metrics_log = MetricsLog(
            log_dir,
            tensorboard=cfg.log.tensorboard,
            progress=cfg.log.progress,
            total_steps=self.total_steps,
            start_step=start,
            enabled=main,
        )
        throughput = Throughput(
            flops_per_token(self.config, cfg.data.row_length, frozen_weights=cfg.lora.enabled),
            cfg.data.batch_size * cfg.data.row_length,
            self.mesh.devices.size,
            peak_flops(jax.devices()[0], cfg.log.peak_tflops),
        )
        history: list[dict[str, Any]] = []
        last_saved = None
        step = start
        stop = self.total_steps if until is None else min(until, self.total_steps)
        checkpoint_dir = self.checkpointer.directory if self.checkpointer is not None else None
        preemption = Preemption(metrics_log.print, checkpoint_dir=checkpoint_dir)
        try:
            with preemption:
                preemption.start(step)
                while step < stop:
                    try:
                        host_batch = next(self.data)
                    except StopIteration:
                        metrics_log.print(f"the data ended after {step} steps")
                        break
                    first = step == start
                    compiling = first and not getattr(self.step_fn, "compiled", False)  # a cached step is ready
                    if compiling:
                        metrics_log.print(f"compiling the train step (batch {cfg.data.batch_size} x {cfg.data.row_length}) ...")
                        compile_start = time.perf_counter()
                    self.state, metrics = self.step_fn(self.state, self.frozen, self.device_batch(host_batch))
                    step += 1
                    if compiling:  # the call returns once compiled; the step itself runs on asynchronously
                        with contextlib.suppress(AttributeError):  # a step function that takes no attributes
                            self.step_fn.compiled = True
                        metrics_log.print(f"train step ready in {time.perf_counter() - compile_start:.1f} s")
                    if callback is not None:
                        callback(step, host_batch, metrics)
                    throughput.add(metrics["tokens"])  # all hosts' document tokens, summed on device
                    stopping = step < stop and preemption.should_stop(step)
                    if first or step % cfg.log.every_steps == 0 or step == stop or stopping:
                        values = {k: v.item() for k, v in jax.device_get(metrics).items()}
                        timing = throughput.read()
                        if first:  # the first step includes compilation: time it, but keep it out of throughput
                            values["compile_and_step_s"] = timing["step_time_s"]
                        else:
                            values.update(timing)
                        history.append({"step": step, **values})
                        metrics_log.write(step, values)
                    else:
                        metrics_log.advance(step)
                    if stopping:
                        preemption.begin_stop(step)
                        self.stopped = Stopped(preemption.reason, step, checkpoint_dir)
                        metrics_log.print(f"stopping at step {step} ({preemption.reason})")
                        break
                    if self.checkpointer is not None and step % self.checkpointer.every_steps == 0:
                        if self._save(step, metrics_log):
                            last_saved = step
                if self.checkpointer is not None and last_saved != step and step > start:
                    self._save(step, metrics_log, force=True)
                if self.checkpointer is not None:
                    waited = time.perf_counter()
                    self.checkpointer.wait()
                    if step > start:
                        metrics_log.print(f"checkpoint step {step} saved ({time.perf_counter() - waited:.1f} s)")
        finally:
            metrics_log.close()
        return history

    def _save(self, step: int, metrics_log: MetricsLog, *, force: bool = False) -> bool:
        """Start a checkpoint of `step` (asynchronous when configured), saying so; whether one started."""
        if step in self.checkpointer.all_steps():
            return False
        metrics_log.print(f"saving checkpoint step {step} to {self.checkpointer.directory} ...")
        return self.checkpointer.save(step, self.state, self.data, self.meta(), force=force)

    # ---- weights out ------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The model's parameters now (pure dict, sharded), LoRA pairs folded into the base weights."""
        if self.cfg.lora.enabled:
            merge = jax.jit(lambda base, pairs: lora_lib.merge(base, pairs, self.cfg.lora))
            with jax.set_mesh(self.mesh):
                return merge(self.frozen["base"], self.state.params)
        return self.state.params

    def model(self) -> DreamModel:
        """A DreamModel holding the current weights (LoRA merged)."""
        return nnx.merge(self.graphdef, self.params())

    def export(self, path: str, *, dtype: Any = None) -> list[str]:
        """Write the current weights as a Hugging Face checkpoint (config.json, safetensors, tokenizer)."""
        from pdjax.decode.model_info import write_generation_config
        from pdjax.model.checkpoint import save_pretrained

        names = save_pretrained(self.model(), path, tokenizer=self.tokenizer, dtype=dtype)
        if jax.process_index() == 0:  # what pdjax.decode reads: the mode trained, a diffusion model's mask count
            write_generation_config(path, self.cfg.data.mode, self.cfg.data.eos_fill_length)
        return names

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = print) -> Trainer:
    """Create, train (resuming if asked), export when ``checkpoint.export_dir`` is set; return the trainer.

    A run stopped by a signal (``trainer.stopped``) is checkpointed but not exported.
    """
    trainer = Trainer.create(cfg, resume=resume, log=log)
    try:
        trainer.train()
        if cfg.checkpoint.export_dir is not None and trainer.stopped is None:
            names = trainer.export(cfg.checkpoint.export_dir)
            if log is not None:
                log(f"exported {len(names)} weight file(s) to {cfg.checkpoint.export_dir}")
    finally:
        trainer.close()
    return trainer
