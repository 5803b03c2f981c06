"""Region store: per-image proposal boxes, scores and teacher embeddings in Parquet.

Written by the extraction pipeline (:class:`RegionStoreWriter`), read by training,
LP-OVOD retrieval and analysis (:class:`RegionStore`, :func:`retrieve_topk`).
"""

from ovdlab.platform.store.reader import RegionBatch, RegionStore, is_complete
from ovdlab.platform.store.retrieval import Retrieved, retrieve_topk
from ovdlab.platform.store.schema import (
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    Failure,
    ImageRegions,
    Manifest,
    StoreError,
    region_schema,
)
from ovdlab.platform.store.writer import RegionStoreWriter

__all__ = [
    "REQUIRED_FIELDS",
    "SCHEMA_VERSION",
    "Failure",
    "ImageRegions",
    "Manifest",
    "RegionBatch",
    "RegionStore",
    "RegionStoreWriter",
    "Retrieved",
    "StoreError",
    "is_complete",
    "region_schema",
    "retrieve_topk",
]
