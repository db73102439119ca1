"""Routes for the server-wide steering (state in defaults.py), in ggsteer's shape and in the shapes
scripts for llama.cpp-family servers already send.

ggsteer:
    GET    /v1/steering   {"steering": {...}, "active": [{vector, op, strength, layers, when}]}
    POST   /v1/steering   {"steering": {"calm": 0.4, "honest": {"strength": 0.6, "op": "add_normalized"}}}
    DELETE /v1/steering   no default steering
llama-server's /lora-adapters pattern applied to control vectors (llama.cpp PR #24740):
    GET    /cvectors      [{"id": 0, "path": "calm.gguf", "scale": 0.4}, ...] every vector in the registry
    POST   /cvectors      [{"id": 0, "scale": 0.4}]: vectors left out get scale 0
ik_llama.cpp (PR #1223):
    GET    /control-vectors          [{"id", "path", "scale", "layer_start", "layer_end", "applied"}]
    POST   /control-vectors/load     {"path": "calm.gguf", "scale": 1.0, "layer_start": 1, "layer_end": N}
    POST   /control-vectors/unload   {"id": 0}
    POST   /control-vectors/apply    [{"id": 0, "scale": 0.5, "layer_start"?, "layer_end"?}]: others get 0
In the llama.cpp shapes a scale is a plain coefficient on the file's directions over all its layers
in [layer_start, layer_end], as in llama.cpp; for ggsteer's files that is also the strength.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ggsteer.serve.defaults import DefaultSteering
from ggsteer.serve.errors import ApiError
from ggsteer.serve.registry import layers_setting
from ggsteer.serve.schemas import read_json_body, read_json_value
from ggsteer.serve.vector_store import VectorStore
from ggsteer.steering.interventions import default_strength


def steering_routes(defaults: DefaultSteering, store: VectorStore, dependencies: list) -> APIRouter:
    router = APIRouter(dependencies=dependencies)
    llama = LlamaShapes(defaults, store)

    @router.get("/v1/steering")
    def get_default_steering():
        return describe(defaults)

    @router.post("/v1/steering")
    async def set_default_steering(request: Request):
        steering = (await read_json_body(request)).get("steering")
        if not isinstance(steering, dict):
            raise ApiError(400, 'send {"steering": {"name": strength, ...}} ({} for none)', "steering")
        defaults.replace(list(steering.items()))
        return describe(defaults)

    @router.delete("/v1/steering")
    def clear_default_steering():
        defaults.clear()
        return describe(defaults)

    @router.get("/cvectors")
    def list_cvectors():
        return llama.registry_list()

    @router.post("/cvectors")
    async def set_cvectors(request: Request):
        llama.set_scales(await read_json_array(request), keep_listed_only=False)
        return {"success": True}

    @router.get("/control-vectors")
    def list_control_vectors():
        return llama.loaded_list()

    @router.post("/control-vectors/load")
    async def load_control_vector(request: Request):
        return ik_answer(lambda body: {"success": True, "id": llama.load(body)}, await read_json_body(request))

    @router.post("/control-vectors/unload")
    async def unload_control_vector(request: Request):
        return ik_answer(lambda body: llama.unload(body) or {"success": True}, await read_json_body(request))

    @router.post("/control-vectors/apply")
    async def apply_control_vectors(request: Request):
        body = await read_json_array(request)
        return ik_answer(lambda items: llama.set_scales(items, keep_listed_only=True) or {"success": True}, body)

    return router


def describe(defaults: DefaultSteering) -> dict:
    return {"object": "steering", "steering": defaults.spec(), "active": defaults.active()}


async def read_json_array(request: Request) -> list:
    body = await read_json_value(request)
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise ApiError(400, 'send a JSON array of {"id": ..., "scale": ...} objects')
    return body


def ik_answer(handle, body):
    """ik_llama.cpp's answers: the result, or 400 with {"success": false, "error": ...}."""
    try:
        return handle(body)
    except ApiError as error:
        return JSONResponse({"success": False, "error": error.message}, status_code=error.status)


class LlamaShapes:
    """The llama.cpp-family endpoints as operations on the one default list."""

    def __init__(self, defaults: DefaultSteering, store: VectorStore):
        self.defaults = defaults
        self.store = store

    def _vector(self, name: str):
        return self.store.registry.vectors[name].vector

    def setting(self, name: str, scale, layer_start=None, layer_end=None) -> dict:
        """A llama.cpp scale over the file's layers in [layer_start, layer_end] as a ggsteer setting."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ApiError(400, f"scale for {name!r} must be a number, got {scale!r}", "scale")
        start = 1 if layer_start is None else layer_start
        end = self.store.model.n_layer if layer_end is None else layer_end
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise ApiError(400, "layer_start and layer_end must be integers", "layer_start")
        layers = [il for il in self._vector(name).layers if start <= il <= end]
        if not layers:
            raise ApiError(400, f"no layer of {name!r} lies in {start}..{end} (it has {self._vector(name).layers})",
                           "layer_start")
        return {"strength": scale, "layers": layers}

    def scale_of(self, name: str, value) -> float:
        """The coefficient an entry adds (0 for ablate and clamp, which add nothing fixed)."""
        if not isinstance(value, dict):
            return float(value)
        if value.get("op", "add") != "add":
            return 0.0
        strength = value.get("strength")
        return float(default_strength(self._vector(name)) if strength is None else strength)

    def registry_list(self) -> list[dict]:
        spec = self.defaults.spec()
        return [{"id": i, "path": entry.path.name, "scale": self.scale_of(name, spec.get(name, 0.0))}
                for i, (name, entry) in enumerate(self.store.registry.vectors.items())]

    def loaded_list(self) -> list[dict]:
        answer = []
        for i, (name, value) in enumerate(self.defaults.entries):
            layers = layers_setting(value.get("layers"), self.store.model.n_layer) if isinstance(value, dict) else None
            layers = layers or self._vector(name).layers
            scale = self.scale_of(name, value)
            answer.append({"id": i, "path": f"{name}.gguf", "scale": scale, "layer_start": min(layers),
                           "layer_end": max(layers),
                           "applied": bool(self.store.registry.controls({name: value}, self.store.model))})
        return answer

    def set_scales(self, items: list[dict], keep_listed_only: bool) -> None:
        """/cvectors: ids index the registry; /control-vectors/apply: ids index the loaded list."""
        names = list(self.store.registry.vectors) if not keep_listed_only else [n for n, _ in self.defaults.entries]
        current = dict(self.defaults.entries)
        chosen = {}
        for item in items:
            index = item.get("id")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(names):
                raise ApiError(400, f"Invalid control vector id {index!r} (there are {len(names)})", "id")
            name = names[index]
            old = current.get(name) if isinstance(current.get(name), dict) else {}
            start, end = item.get("layer_start"), item.get("layer_end")
            if start is None and end is None and old.get("layers"):
                old_layers = layers_setting(old["layers"], self.store.model.n_layer)
                start, end = min(old_layers), max(old_layers)
            # llama-server reads a missing scale as 0; ik_llama.cpp's apply requires one
            scale = item.get("scale", None if keep_listed_only else 0.0)
            chosen[name] = self.setting(name, scale, start, end)
        if keep_listed_only:  # ik: every loaded vector stays listed, those not named at scale 0 (off, whatever op)
            entries = [(n, chosen.get(n, {"strength": 0.0, "layers": v.get("layers")} if isinstance(v, dict) else 0.0))
                       for n, v in self.defaults.entries]
        else:
            entries = list(chosen.items())
        self.defaults.replace(entries)

    def load(self, body: dict) -> int:
        name = self.store.load_file(body.get("path")).name
        setting = self.setting(name, body.get("scale", 1.0), body.get("layer_start"), body.get("layer_end"))
        entries = self.defaults.entries
        names = [n for n, _ in entries]
        if name in names:
            entries[names.index(name)] = (name, setting)
        else:
            entries.append((name, setting))
        self.defaults.replace(entries)
        return [n for n, _ in entries].index(name)

    def unload(self, body: dict) -> None:
        index = body.get("id")
        entries = self.defaults.entries
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(entries):
            raise ApiError(400, "Missing or invalid 'id' field", "id")
        del entries[index]
        self.defaults.replace(entries)
