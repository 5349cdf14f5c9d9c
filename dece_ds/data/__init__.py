"""Data pipelines for continued pretraining: streaming packed corpora with an exact resume position."""

from .streaming import StreamingPackedDataset, count_tokens, infer_format

__all__ = ["StreamingPackedDataset", "count_tokens", "infer_format"]
