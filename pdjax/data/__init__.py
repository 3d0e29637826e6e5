"""Training data: sources, chat formatting, validation report, ablations, `[PAD]` augmentation, packing (grain).

The trainer calls `build_pipeline(DataConfig(...), tokenizer)` and gets a grain
iterator of packed batches (dicts of int32 [rows, row_length] arrays:
``tokens`` and the five `pdjax.structure.Segments` fields) and a `DataReport`.
"""

from pdjax.data.config import DataConfig
from pdjax.data.examples import build_document
from pdjax.data.packing import first_fit, packing_efficiency
from pdjax.data.pipeline import BATCH_KEYS, build_pipeline
from pdjax.data.report import DataReport, SkippedRow
from pdjax.data.sources import DataSourceError, RowError, load_source, open_source, prepare_source
from pdjax.data.transforms import ablate_topic, drop_sync, with_pads

__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "DataReport",
    "DataSourceError",
    "RowError",
    "SkippedRow",
    "ablate_topic",
    "build_document",
    "build_pipeline",
    "drop_sync",
    "first_fit",
    "load_source",
    "open_source",
    "packing_efficiency",
    "prepare_source",
    "with_pads",
]
