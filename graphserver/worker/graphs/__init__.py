"""CUDA graphs: exact-length graphs of the batch-1 session step (seq.py), batched decode graphs
keyed by (bucket, length class) (batch.py), and the CUDA capturer both drive (cuda.py)."""
from .batch import BatchGraphManager, default_buckets
from .seq import GraphManager, GraphStats, percentile

__all__ = ["BatchGraphManager", "GraphManager", "GraphStats", "default_buckets", "percentile"]
