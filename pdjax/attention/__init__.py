"""Segment-id attention (METHOD §2): one entry point, an exact reference, and TPU kernels."""

from pdjax.attention.api import IMPLEMENTATIONS, AttentionFn, attention
from pdjax.attention.kernel import pallas_attention
from pdjax.attention.reference import reference_attention
from pdjax.attention.splash import splash_dense_attention
from pdjax.attention.tiles import TileClass, TileReport, tile_classes, tile_report

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionFn",
    "TileClass",
    "TileReport",
    "attention",
    "pallas_attention",
    "reference_attention",
    "splash_dense_attention",
    "tile_classes",
    "tile_report",
]
