"""Data: sources of documents, token shards on disk, and the batches a trainer reads."""

from slmforge.data.batch import IGNORE, Batch
from slmforge.data.loader import TokenDataset, TrainBatches, val_batches
from slmforge.data.prepare import format_report, prepare_dataset
from slmforge.data.sources import (
    Source,
    SourceStats,
    default_sources,
    iter_documents,
    parse_source,
)

__all__ = [
    "IGNORE",
    "Batch",
    "Source",
    "SourceStats",
    "TokenDataset",
    "TrainBatches",
    "default_sources",
    "format_report",
    "iter_documents",
    "parse_source",
    "prepare_dataset",
    "val_batches",
]
