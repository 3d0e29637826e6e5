"""The training-data pipeline: `build_pipeline(config, tokenizer) -> (iterator, report)`.

Lanes: the source rows are cut into ``batch_size`` contiguous *lanes*, one per
row of the global batch; global batch b holds packed row b of every lane, in
lane order. Host h of H feeds lanes [h B/H, (h+1) B/H) and reads only their
source rows (a disjoint, contiguous share), so the global batch of every step
is the same whether 1, 2 or 4 hosts feed it, and a run may resume on a
different host count (elastic restart): the iterator state is the batch index.
(Host-major lane order matches `jax.make_array_from_process_local_data` on
meshes whose batch axes run over hosts in process order, as `jax.make_mesh`
lays them out.)

Start-up: this host reads its lanes' source rows, prepares and validates them
once (`Preparer`), prints a summary of what it skipped and why, and plans the
epochs' packing to know how many batches it will yield.

Epoch e of lane j (deterministic given seed, j and e): the lane's documents are
shuffled, each span gets a fresh U{0..pad_max} `[PAD]` draw, and first-fit packs
them into rows of ``row_length`` tokens; within an epoch no document is fed
twice. A lane's epochs form one stream of rows (row k is built on demand, with
its segment ids, by `pdjax.structure.pack_documents`); a grain ``MapDataset``
indexes the batches, and the grain iterator's ``get_state()`` is a small
JSON-able dict that ``set_state()`` resumes with the identical remaining batches.

Batches are dicts of int32 NumPy arrays [rows per host, row_length]:
``tokens`` and the five `Segments` fields (``block_id``, ``visible_from``,
``position``, ``doc_id``, ``role``).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pdjax.data.config import DataConfig
from pdjax.data.examples import PLANNED_MODES, Preparer, build_document, prepared_features
from pdjax.data.packing import first_fit, packing_efficiency
from pdjax.data.report import DataReport, SkippedRow
from pdjax.data.sources import DataSourceError, host_range, open_source
from pdjax.structure import ControlIds, Segments, pack_documents

if TYPE_CHECKING:
    import grain

BATCH_KEYS: tuple[str, ...] = ("tokens",) + Segments._fields


@dataclasses.dataclass(frozen=True)
class Corpus:
    """This host's validated documents, flat: document d is ``tokens[offsets[d]:offsets[d + 1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    block_ends: np.ndarray  # `</async>` positions, document d's at block_offsets[d]:block_offsets[d + 1]
    block_offsets: np.ndarray
    syncs: np.ndarray
    rows: np.ndarray  # source row index of each document

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, first: int, stop: int) -> "Corpus":
        """Documents [first, stop) as a corpus of their own."""
        o, b = self.offsets, self.block_offsets
        return Corpus(
            self.tokens[o[first] : o[stop]],
            o[first : stop + 1] - o[first],
            self.prompt_len[first:stop],
            self.block_ends[b[first] : b[stop]],
            b[first : stop + 1] - b[first],
            self.syncs[first:stop],
            self.rows[first:stop],
        )

    def digest(self) -> bytes:
        """32 bytes that change with any document's tokens or boundaries."""
        h = hashlib.sha256(self.offsets.tobytes())
        h.update(self.tokens.tobytes())
        return h.digest()


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """One epoch: packed rows (document indices), the `[PAD]` count of every span, document lengths."""

    rows: list[list[int]]
    pads: np.ndarray
    lengths: np.ndarray


class Epochs:
    """Plans one lane's epochs on demand (a small LRU cache) and maps a stream row index to (epoch, row).

    Thread-safe: grain builds rows in worker threads.
    """

    def __init__(self, corpus: Corpus, config: DataConfig, lane: int, cache_size: int = 2):
        self.corpus = corpus
        self.config = config
        self.lane = lane
        self.cache_size = cache_size
        self._counts: list[int] = []
        self._tokens: list[int] = []
        self._ends: list[int] = []
        self._cache: collections.OrderedDict[int, EpochPlan] = collections.OrderedDict()
        self._lock = threading.RLock()

    def plan(self, epoch: int) -> EpochPlan:
        """The packing of ``epoch``; the same on every call and every run with this seed."""
        with self._lock:
            if epoch in self._cache:
                self._cache.move_to_end(epoch)
                return self._cache[epoch]
        plan = self._make_plan(epoch)
        with self._lock:
            self._cache[epoch] = plan
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return plan

    def _make_plan(self, epoch: int) -> EpochPlan:
        cfg, corpus = self.config, self.corpus
        num_blocks = int(corpus.block_offsets[-1])
        pads = np.zeros(num_blocks, np.int32)
        if cfg.pad_max and cfg.mode in PLANNED_MODES:
            rng = np.random.default_rng([cfg.seed, self.lane, epoch, 1])
            pads = rng.integers(0, cfg.pad_max + 1, size=num_blocks, dtype=np.int32)
        summed = np.concatenate([[0], np.cumsum(pads, dtype=np.int64)])
        lengths = corpus.lengths + summed[corpus.block_offsets[1:]] - summed[corpus.block_offsets[:-1]]
        if cfg.ablate_sync and cfg.mode in PLANNED_MODES:
            lengths = lengths - corpus.syncs
        order = np.arange(len(corpus))
        if cfg.shuffle:
            order = np.random.default_rng([cfg.seed, self.lane, epoch, 0]).permutation(len(corpus))
        rows = [[int(order[i]) for i in row] for row in first_fit(lengths[order], cfg.row_length, cfg.pack_window)]
        return EpochPlan(rows, pads, lengths)

    def _count_through(self, epoch: int) -> None:
        with self._lock:
            while len(self._counts) <= epoch:
                plan = self.plan(len(self._counts))
                self._counts.append(len(plan.rows))
                self._tokens.append(int(plan.lengths.sum()))
                self._ends.append((self._ends[-1] if self._ends else 0) + len(plan.rows))

    def num_rows(self, epoch: int) -> int:
        """Packed rows of ``epoch``."""
        self._count_through(epoch)
        return self._counts[epoch]

    def num_tokens(self, epoch: int) -> int:
        """Document tokens (`[PAD]` draw included) of ``epoch``."""
        self._count_through(epoch)
        return self._tokens[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of stream row ``index``."""
        with self._lock:
            while not self._ends or self._ends[-1] <= index:
                self._count_through(len(self._counts))
            epoch = bisect.bisect_right(self._ends, index)
            return epoch, index - (self._ends[epoch - 1] if epoch else 0)


class RowBuilder:
    """A lane's stream row index -> packed row dict; indices past the real rows give all-padding filler rows."""

    def __init__(self, epochs: Epochs, ids: ControlIds, pad_id: int, real_rows: int | None):
        self.epochs = epochs
        self.ids = ids
        self.pad_id = pad_id
        self.real_rows = real_rows

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        cfg, corpus = self.epochs.config, self.epochs.corpus
        docs: list[tuple[np.ndarray, Segments]] = []
        if self.real_rows is None or index < self.real_rows:
            epoch, row = self.epochs.locate(int(index))
            plan = self.epochs.plan(epoch)
            for d in plan.rows[row]:
                blocks = slice(corpus.block_offsets[d], corpus.block_offsets[d + 1])
                docs.append(
                    build_document(
                        corpus.tokens[corpus.offsets[d] : corpus.offsets[d + 1]],
                        int(corpus.prompt_len[d]),
                        corpus.block_ends[blocks],
                        plan.pads[blocks],
                        self.ids,
                        cfg,
                    )
                )
        tokens, seg = pack_documents(docs, cfg.row_length, self.pad_id)
        return {"tokens": tokens, **seg._asdict()}


class BatchBuilder:
    """Batch index b -> this host's rows of global batch b: row b of each of its lanes, stacked in lane order."""

    def __init__(self, lanes: list[RowBuilder]):
        self.lanes = lanes

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rows = [lane(int(index)) for lane in self.lanes]
        return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def lane_ranges(num_rows: int, num_lanes: int) -> list[range]:
    """The contiguous source rows of each lane (sizes differ by at most one)."""
    return [host_range(num_rows, j, num_lanes) for j in range(num_lanes)]


def prepare_corpus(
    config: DataConfig, tokenizer: Any, ids: ControlIds, lanes: range
) -> tuple[list[Corpus], list[SkippedRow], int]:
    """Read, prepare and validate the source rows of `lanes`: (each lane's documents, skipped rows, rows read)."""
    opened = open_source(config)  # lines that are no row (not JSON, ...) are in opened.unreadable
    source, fmt = opened.dataset, opened.fmt
    if config.max_source_rows is not None:
        source = source.select(range(min(config.max_source_rows, len(source))))
    per_lane = lane_ranges(len(source), config.batch_size)[lanes.start : lanes.stop]
    shard = range(per_lane[0].start, per_lane[-1].stop)
    source = source.select(shard)
    prepared = source.map(
        Preparer(tokenizer, ids, config, fmt, shard.start),
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=list(source.column_names),
        features=prepared_features(),
        num_proc=config.num_proc,
        desc="pdjax: tokenize and validate",
    )
    rule = np.asarray(prepared["rule"], dtype=object)
    kept = rule == ""
    rows = np.asarray(prepared["row"], np.int64)
    skipped = [
        opened.skipped_row(int(r), str(k), int(p), str(d))
        for r, k, p, d, keep in zip(rows, rule, prepared["position"], prepared["detail"], kept)
        if not keep
    ]
    skipped = opened.with_unreadable(skipped, report_unreadable=lanes.start == 0)  # every host reads them all

    def flat(column: str) -> tuple[np.ndarray, np.ndarray]:
        array = prepared.data.column(column).combine_chunks()
        values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        lengths = array.value_lengths().to_numpy(zero_copy_only=False)[kept]  # skipped rows hold []
        return values, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    tokens, offsets = flat("tokens")
    block_ends, block_offsets = flat("block_ends")
    corpus = Corpus(
        tokens,
        offsets,
        np.asarray(prepared["prompt_len"], np.int32)[kept],
        block_ends,
        block_offsets,
        np.asarray(prepared["syncs"], np.int64)[kept],
        rows[kept],
    )
    cuts = np.searchsorted(corpus.rows, [r.start for r in per_lane] + [shard.stop])
    return [corpus.subset(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])], skipped, len(source)


def _shard(config: DataConfig) -> tuple[int, int, bool]:
    """(index, count, from_jax) of this host's shard."""
    if config.shard_count is not None:
        return config.shard_index, config.shard_count, False
    import jax

    return jax.process_index(), jax.process_count(), True


def _agree(local_batches: int, from_jax: bool, shard_count: int) -> int:
    """The batch count every host yields: the longest lane's (shorter lanes add filler rows)."""
    if not from_jax or shard_count == 1:
        return local_batches
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(local_batches, np.int32))))


def _fingerprint(config: DataConfig, lanes: list[Corpus], from_jax: bool, shard: tuple[int, int]) -> str:
    """Identifies the data order of the whole run (every lane), the same on every host and for every host count.

    Explicit shards (no jax agreement) can only see their own lanes: then the shard is part of it.
    """
    ignored = ("num_proc", "num_threads", "prefetch", "cache_dir", "skipped_path", "shard_index", "shard_count")
    ordered = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignored}
    digests = np.frombuffer(b"".join(lane.digest() for lane in lanes), np.uint8).reshape(len(lanes), 32)
    if from_jax and shard[1] > 1:
        from jax.experimental import multihost_utils

        digests = np.asarray(multihost_utils.process_allgather(digests)).astype(np.uint8).reshape(-1, 32)
    h = hashlib.sha256(repr(sorted(ordered.items())).encode())
    if not from_jax and shard[1] > 1:
        h.update(repr(shard).encode())
    h.update(digests.tobytes())
    return h.hexdigest()[:16]


def build_pipeline(
    config: DataConfig, tokenizer: Any, *, log: Callable[[str], None] | None = print
) -> tuple["grain.DatasetIterator", DataReport]:
    """The batch iterator (a grain ``DatasetIterator``) and the data report of this host.

    Batches: dicts of int32 arrays [batch_size // shard_count, row_length] with
    keys `BATCH_KEYS`. Save ``iterator.get_state()`` with a checkpoint (or use
    ``grain.checkpoint.CheckpointSave``) and ``set_state`` it on a fresh
    pipeline built from the same config to continue with the same batches.
    ``log`` receives the start-up summary (None: quiet).
    """
    import grain

    shard_index, shard_count, from_jax = _shard(config)
    if config.batch_size % shard_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {shard_count} hosts")
    local_batch = config.batch_size // shard_count
    own = range(shard_index * local_batch, (shard_index + 1) * local_batch)
    ids = ControlIds.from_tokenizer(tokenizer)
    pad_id = config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else ids.eos

    corpora, skipped, rows_read = prepare_corpus(config, tokenizer, ids, own)
    epochs = [Epochs(corpus, config, lane) for lane, corpus in zip(own, corpora)]
    planned = range(config.num_epochs or 1)
    # A lane without documents only feeds filler rows: fine for a finite run, endless planning for a forever one.
    usable = any(len(c) for c in corpora) and (config.num_epochs is not None or all(len(c) for c in corpora))
    filled = [e for e in epochs if len(e.corpus)]
    rows_per_lane = [sum(e.num_rows(k) for k in planned) if len(e.corpus) else 0 for e in epochs]
    rows_per_epoch = [sum(e.num_rows(k) for e in filled) for k in planned] if usable else [0]
    real_rows = sum(rows_per_lane)
    if config.num_epochs is None:
        total_batches, filler, stream_batches = None, 0, sys.maxsize
    else:
        total_batches = _agree(max(rows_per_lane), from_jax, shard_count)
        stream_batches = total_batches
        filler = total_batches * local_batch - real_rows
    documents = sum(len(c) for c in corpora)
    report = DataReport(
        source=config.source,
        mode=config.mode,
        host=shard_index,
        num_hosts=shard_count,
        rows_read=rows_read,
        documents=documents,
        tokens=sum(int(c.lengths.sum()) for c in corpora),
        skipped=skipped,
        row_length=config.row_length,
        batch_size=local_batch,
        rows_per_epoch=rows_per_epoch,
        total_batches=total_batches,
        filler_rows=filler,
        packing_efficiency=packing_efficiency(
            sum(e.num_tokens(k) for e in filled for k in planned) if usable else 0,
            real_rows + filler,
            config.row_length,
        ),
        fingerprint=_fingerprint(config, corpora, from_jax, (shard_index, shard_count)),
    )
    if config.skipped_path is not None:
        stem, ext = os.path.splitext(config.skipped_path)
        report.write_skipped(f"{stem}.host{shard_index}{ext}" if shard_count > 1 else config.skipped_path)
    if log is not None:
        log(report.summary())
    if not usable:
        empty = [lane for lane, c in zip(own, corpora) if not len(c)]
        where = f"{config.source} on host {shard_index}/{shard_count}"
        if documents:  # some lanes have documents, others none
            where = (f"lane(s) {empty} of {where} (each of the batch_size={config.batch_size} rows of a batch reads a "
                     f"contiguous 1/{config.batch_size} of the source; with num_epochs=null every one needs documents)")
        raise DataSourceError(
            f"no usable rows in {where}: "
            + "; ".join(f"{n} {rule}" for rule, n in report.skipped_by_rule.items())
            + (f", e.g. {skipped[0].where}: {skipped[0].detail}" if skipped else "")
            + (f" (every skipped row with its reason: {report.skipped_path})" if report.skipped_path else "")
        )

    lanes = [RowBuilder(e, ids, pad_id, None if config.num_epochs is None else n) for e, n in zip(epochs, rows_per_lane)]
    dataset = grain.MapDataset.range(stream_batches).map(BatchBuilder(lanes))
    options = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch)
    return iter(dataset.to_iter_dataset(options)), report
