"""Server limits and defaults: the one place each is defined (ServerConfig, the worker and
`ggsteer serve`'s options take theirs from here)."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 128
MAX_TOKENS_CAP = 2048
MAX_STOP_STRINGS = 4
DEFAULT_HOST = "127.0.0.1"  # loopback only unless asked
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 8  # requests generating together
MAX_BATCH_LIMIT = 256
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch (more get 429)
MAX_QUEUE_LIMIT = 100_000
MAX_BATCH_WAIT_S = 1.0
# how long the worker waits for more requests before starting a batch that is not full
DEFAULT_BATCH_WAIT_S = 0.02
# the largest vector file a client may upload (Gemma 3 27B's 62 layers x 5376 floats are 1.3 MB)
MAX_VECTOR_FILE_BYTES = 64 << 20
