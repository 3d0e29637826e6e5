"""Segment-id attention (METHOD §2): one entry point, an exact reference, and TPU kernels."""

from pdjax.attention.api import IMPLEMENTATIONS, AttentionFn, attention
from pdjax.attention.reference import reference_attention

__all__ = ["IMPLEMENTATIONS", "AttentionFn", "attention", "reference_attention"]
