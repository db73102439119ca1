"""The OpenAI-compatible steering server (needs the optional [serve] extra: fastapi, uvicorn).

app.py (routes, create_app), settings.py (limits), schemas.py (request bodies), registry.py
(vectors by name), worker.py (the thread that owns the model), responses.py (what clients get),
errors.py (OpenAI-style errors), guard.py (Host, content-type and docs checks before routing),
metrics.py (/metrics). Imports point one way: app -> the others.
"""

from ggsteer.extras import require

__all__ = ["ServerConfig", "VectorRegistry", "create_app"]


def __getattr__(name: str):
    # loaded on first use, so settings.py (read by `ggsteer serve`'s option defaults) needs no extra
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require("fastapi", "serve", "ggsteer serve")
    from ggsteer.serve import app, registry

    exported = {"ServerConfig": app.ServerConfig, "create_app": app.create_app,
                "VectorRegistry": registry.VectorRegistry}
    return exported[name]
