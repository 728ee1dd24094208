"""The server's default knobs, once: `python -m graphserver --help` prints these and the engine
config applies them, so the help cannot drift from what runs. Plain constants, torch-free."""

from __future__ import annotations

DEFAULT_MAX_LEN = 8192  # tokens (prompt + generated) per sequence; clamped to the model's
#                         max_position_embeddings when that is smaller
DEFAULT_BLOCK_SIZE = 16  # tokens per paged-KV block
DEFAULT_KV_SEQS = 4  # the default KV arena holds this many sequences of max_len
DEFAULT_GRAPH_BUCKET = 1  # 1: exact-length graphs
DEFAULT_SESSION_TTL_S = 600.0  # idle sessions older than this are freed when the arena is full
DEFAULT_MODEL_VERSION = "0"  # what hello reports until a reload names another
DEFAULT_MAX_NUM_SEQS = 64  # rows of the batched decode step: generate requests running at once
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill forward (chunks start at multiples of it)
DEFAULT_MAX_WAITING = 4096  # queued generate requests past which new ones get Overloaded
DEFAULT_TP = 1  # tensor-parallel ranks: 1 = one process, no sharding
DEFAULT_LOG_LEVEL = "INFO"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
AUTH_TOKEN_ENV = "GRAPHSERVER_AUTH_TOKEN"  # both ends read the shared token from here
METRICS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode


def default_kv_blocks(max_len: int, block_size: int) -> int:
    """KV blocks of the default arena: DEFAULT_KV_SEQS sequences of max_len tokens each."""
    return DEFAULT_KV_SEQS * -(-max_len // block_size)  # ceil division
