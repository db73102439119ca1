"""Routes for live vector management (the work is in vector_store.py).

    PUT    /v1/vectors/{name}[?overwrite=true]   body: the GGUF file's bytes  -> 201, the vector
    GET    /v1/vectors/{name}                                                  -> the vector
    DELETE /v1/vectors/{name}        unload it (the file stays in the directory)
    POST   /v1/vectors/load          {"path": "sub/calm.gguf"}: a file inside the vectors directory
    POST   /v1/vectors/rescan        re-read the directory: {"added", "removed", "errors", "vectors"}
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ggsteer.serve.errors import ApiError
from ggsteer.serve.schemas import read_json_body
from ggsteer.serve.vector_store import VectorStore


def vector_routes(store: VectorStore, dependencies: list) -> APIRouter:
    router = APIRouter(prefix="/v1/vectors", dependencies=dependencies)

    @router.post("/load")
    async def load_vector(request: Request):
        body = await read_json_body(request)
        return store.load_file(body.get("path")).describe()

    @router.post("/rescan")
    def rescan_vectors():
        return store.rescan()

    @router.get("/{name}")
    def get_vector(name: str):
        entry = store.registry.vectors.get(name)
        if entry is None:
            raise ApiError(404, f"no vector named {name!r}", "name")
        return entry.describe()

    @router.put("/{name}")
    async def upload_vector(name: str, request: Request, overwrite: bool = False):
        store.check_name(name)
        data = await read_file_body(request, store.max_upload_bytes)
        return JSONResponse(store.upload(name, data, overwrite).describe(), status_code=201)

    @router.delete("/{name}")
    def unload_vector(name: str):
        store.unload(name)
        return {"id": name, "object": "vector", "deleted": True}

    return router


async def read_file_body(request: Request, limit: int) -> bytes:
    """The raw body, refused (400) as soon as it passes `limit` bytes."""
    too_big = ApiError(400, f"vector file is larger than {limit} bytes", "file")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)
