"""The OpenAI-compatible steering server (needs the optional [serve] extra: fastapi, uvicorn).

app.py (routes, create_app), settings.py (limits), schemas.py (request bodies), registry.py
(vectors by name), worker.py (the thread that owns the model), responses.py (what clients get),
errors.py (OpenAI-style errors), guard.py (Host, content-type and docs checks before routing),
metrics.py (/metrics). Imports point one way: app -> the others.
"""

from ggsteer.extras import require

require("fastapi", "serve", "ggsteer serve")

from ggsteer.serve.app import ServerConfig, create_app  # noqa: E402
from ggsteer.serve.registry import VectorRegistry  # noqa: E402

__all__ = ["ServerConfig", "VectorRegistry", "create_app"]
