"""Server-wide steering (ggsteer's /v1/steering and the llama.cpp-family shapes), per-request
operations beyond add, and live vector management, on the tiny model behind a real uvicorn.

The oracle: a plain request under a default steering must give exactly the text of the same
request carrying that steering itself, and both the text of generate_batch with the same
interventions alone on a second model instance.
"""

from __future__ import annotations

import itertools
import json
import os
import threading

import httpx
import numpy as np
import pytest
from support.server import (
    TOKENS,
    expected_text,
    make_vector,
    serving,
    tiny_server_model,
    write_vectors,
)

from ggsteer.serve import ServerConfig
from ggsteer.vectors import ControlVector

PROMPT = "the cat sat on"


@pytest.fixture
def vector_dir(tmp_path):
    return tmp_path / "vectors"


@pytest.fixture
def vectors(vector_dir):
    return write_vectors(vector_dir)


@pytest.fixture(scope="module")
def server_model(tiny_model_path):
    with tiny_server_model(tiny_model_path) as model:
        yield model


@pytest.fixture
def client(server_model, vector_dir, vectors):
    """A fresh server on its own vectors directory for each test (the tests change both)."""
    with serving(server_model, vector_dir, ServerConfig(max_batch=4)) as (url, _), httpx.Client(base_url=url,
                                                                                                 timeout=60) as c:
        yield c


def complete(client, steering="absent", prompt=PROMPT, max_tokens=TOKENS) -> str:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
    if steering != "absent":
        body["steering"] = steering
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def intervened_text(reference, items, prompt=PROMPT, max_tokens=TOKENS) -> str:
    return reference.generate_batch([prompt], [items], max_tokens, temperature=0.0)[0]


# -- ggsteer's /v1/steering -----------------------------------------------------------------------


def test_default_steering_applies_to_plain_requests_until_cleared(client, reference, vectors):
    unsteered = expected_text(reference, vectors, PROMPT)
    steering = {"happy": 0.8, "honest": -0.6}
    assert complete(client) == unsteered
    answer = client.post("/v1/steering", json={"steering": steering}).json()
    assert answer["steering"] == steering
    assert [(a["vector"], a["op"], a["strength"], a["layers"]) for a in answer["active"]] == [
        ("happy", "add", 0.8, [1, 2]), ("honest", "add", -0.6, [1, 2])]
    assert client.get("/v1/steering").json() == answer
    steered = complete(client)
    assert steered == complete(client, steering) == expected_text(reference, vectors, PROMPT, steering) != unsteered
    # a request's own steering replaces the default; {} opts out of it
    assert complete(client, {"plain": 0.5}) == expected_text(reference, vectors, PROMPT, {"plain": 0.5})
    assert complete(client, {}) == unsteered
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": TOKENS}
    chat_default = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    reply = client.post("/v1/chat/completions", json={**chat, "steering": steering}).json()
    assert chat_default == reply["choices"][0]["message"]["content"]
    assert client.delete("/v1/steering").json()["steering"] == {}
    assert complete(client) == unsteered


def test_a_bad_default_is_refused_and_the_old_one_kept(client):
    client.post("/v1/steering", json={"steering": {"happy": 0.5}})
    for bad, message in (({"sad": 1}, "unknown vector 'sad'"), ({"happy": 11}, r"within \+-10"),
                         ({"happy": {"op": "twist"}}, "unknown op 'twist'"), ("happy", "steering")):
        response = client.post("/v1/steering", json={"steering": bad})
        assert response.status_code == 400
        assert message.replace("\\", "") in response.json()["error"]["message"]
    assert client.get("/v1/steering").json()["steering"] == {"happy": 0.5}


# -- per-request operations -----------------------------------------------------------------------


def test_per_request_operations_equal_the_same_interventions(client, reference, vectors):
    steering = {"happy": 0.4,
                "honest": {"strength": 0.6, "op": "add_normalized", "when": "generated", "layers": "2"},
                "plain": {"op": "ablate"}}
    items = [reference.intervention(vectors["happy"], 0.4),
             reference.intervention(vectors["honest"], 0.6, op="add_normalized", when="generated", layers=[2]),
             reference.intervention(vectors["plain"], 1.0, op="ablate")]
    text = complete(client, steering)
    assert text == intervened_text(reference, items)
    assert text != intervened_text(reference, items[:2]) != intervened_text(reference, items[:1])
    clamp = complete(client, {"honest": {"op": "clamp", "strength": 0.5, "first_k": 3}})
    assert clamp == intervened_text(reference, [reference.intervention(vectors["honest"], 0.5, op="clamp", first_k=3)])


@pytest.mark.parametrize(("setting", "message"), [
    ({"op": "bogus"}, "unknown op 'bogus': choose one of add, ablate, clamp, add_normalized"),
    ({"when": "later"}, "unknown when 'later': choose one of all, prompt, generated"),
    ({"layers": "2-1"}, "bad layer range '2-1': the end is before the start"),
    ({"layers": "x"}, "bad layer range 'x'"),
    ({"layers": "5"}, "layer 5 is beyond the model: it has layers 0..2"),
    ({"layers": [0]}, "layers [0] are not in the vector"),
    ({"first_k": 0}, "first_k must be within 1..2147483647, got 0"),
    ({"op": "clamp"}, "op 'clamp' needs a strength"),
    ({"strength": "a lot"}, "finite number"),
    ({"scale": 1}, "unknown setting 'scale'"),
])
def test_bad_operations_get_the_cli_messages(client, setting, message):
    response = client.post("/v1/completions", json={"prompt": "x", "steering": {"happy": setting}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "steering"
    assert error["message"].startswith(("steering.happy: ", "steering strength for 'happy'"))


# -- llama.cpp-family shapes ----------------------------------------------------------------------


def test_ik_llama_control_vector_endpoints(client, reference, vectors):
    unsteered = expected_text(reference, vectors, PROMPT)
    assert client.get("/control-vectors").json() == []
    assert client.post("/control-vectors/load",
                       json={"path": "happy.gguf", "scale": 0.8}).json() == {"success": True, "id": 0}
    loaded = {"path": "plain.gguf", "scale": 0.5, "layer_start": 2, "layer_end": 2}
    assert client.post("/control-vectors/load", json=loaded).json() == {"success": True, "id": 1}
    assert client.get("/control-vectors").json() == [
        {"id": 0, "path": "happy.gguf", "scale": 0.8, "layer_start": 1, "layer_end": 2, "applied": True},
        {"id": 1, "path": "plain.gguf", "scale": 0.5, "layer_start": 2, "layer_end": 2, "applied": True}]
    both = [reference.intervention(vectors["happy"], 0.8, layers=[1, 2]),
            reference.intervention(vectors["plain"], 0.5, layers=[2], raw=True)]
    assert complete(client) == intervened_text(reference, both)
    # apply: the listed ids get their scale, every other loaded vector 0 (llama.cpp's semantics)
    assert client.post("/control-vectors/apply", json=[{"id": 1, "scale": -0.7}]).json() == {"success": True}
    assert [v["scale"] for v in client.get("/control-vectors").json()] == [0.0, -0.7]
    assert complete(client) == intervened_text(reference,
                                               [reference.intervention(vectors["plain"], -0.7, layers=[2], raw=True)])
    bad = client.post("/control-vectors/apply", json=[{"id": 7, "scale": 1}])
    assert bad.status_code == 400 and bad.json()["success"] is False
    assert [v["scale"] for v in client.get("/control-vectors").json()] == [0.0, -0.7]  # nothing changed
    assert client.post("/control-vectors/unload", json={"id": 1}).json() == {"success": True}
    assert client.post("/control-vectors/unload", json={"id": 1}).status_code == 400
    assert [v["path"] for v in client.get("/control-vectors").json()] == ["happy.gguf"]
    assert complete(client) == unsteered


def test_lora_adapter_style_cvectors_endpoint(client, reference, vectors):
    listed = client.get("/cvectors").json()
    assert listed == [{"id": i, "path": f"{name}.gguf", "scale": 0.0}
                      for i, name in enumerate(["happy", "honest", "plain"])]
    assert client.post("/cvectors", json=[{"id": 1, "scale": 0.9}]).json() == {"success": True}
    assert [v["scale"] for v in client.get("/cvectors").json()] == [0.0, 0.9, 0.0]
    assert complete(client) == expected_text(reference, vectors, PROMPT, {"honest": 0.9})
    assert client.get("/v1/steering").json()["active"][0]["vector"] == "honest"  # one default, three shapes
    assert client.post("/cvectors", json=[{"id": 3, "scale": 1}]).status_code == 400
    assert client.post("/cvectors", json=[]).json() == {"success": True}
    assert complete(client) == expected_text(reference, vectors, PROMPT)


def test_compatible_endpoints_refuse_paths_outside_the_directory(client, vector_dir, tmp_path):
    make_vector(48, 3).save(tmp_path / "outside.gguf")
    (vector_dir / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    for path in ("../outside.gguf", str(tmp_path / "outside.gguf"), "link.gguf", "/etc/passwd", "missing.gguf"):
        response = client.post("/control-vectors/load", json={"path": path})
        assert response.status_code == 400 and response.json()["success"] is False, path
        assert client.post("/v1/vectors/load", json={"path": path}).status_code == 400
    assert client.get("/control-vectors").json() == []
    # an absolute path that does lie inside the directory is what ik_llama.cpp scripts send
    assert client.post("/control-vectors/load", json={"path": str(vector_dir / "honest.gguf")}).json()["success"]


# -- live vector management -----------------------------------------------------------------------


_FILE_NUMBERS = itertools.count()


def gguf_bytes(tmp_path, vector: ControlVector, name="v") -> bytes:
    # a fresh file each call: id(vector) was reused once an earlier vector was freed (FileExistsError)
    path = tmp_path / f"{name}-{next(_FILE_NUMBERS)}.gguf"
    vector.save(path)
    return path.read_bytes()


def directory_state(directory) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() if entry.is_file() else b"" for entry in sorted(directory.iterdir())}


def test_an_uploaded_vector_is_usable_at_once_and_after_a_restart(client, reference, vectors, vector_dir, tmp_path,
                                                                  server_model):
    new = make_vector(48, 77)
    response = client.put("/v1/vectors/calm", content=gguf_bytes(tmp_path, new))
    assert response.status_code == 201 and response.json()["id"] == "calm"
    expected = intervened_text(reference, [reference.intervention(new, 0.7)])
    assert complete(client, {"calm": 0.7}) == expected != expected_text(reference, vectors, PROMPT)
    assert "calm" in [v["id"] for v in client.get("/v1/vectors").json()["data"]]
    assert client.put("/v1/vectors/calm", content=gguf_bytes(tmp_path, make_vector(48, 78))).status_code == 409
    np.testing.assert_array_equal(ControlVector.load(vector_dir / "calm.gguf").directions[1], new.directions[1])
    # a restart: a new server loading the same directory knows it
    with serving(server_model, vector_dir, ServerConfig(max_batch=2)) as (url, _), \
            httpx.Client(base_url=url, timeout=60) as other:
        assert complete(other, {"calm": 0.7}) == expected


def nan_vector_bytes(tmp_path) -> bytes:
    data = bytearray(gguf_bytes(tmp_path, make_vector(48, 5)))
    data[-4:] = np.array([np.nan], np.float32).tobytes()  # the last float of the last direction
    return bytes(data)


@pytest.mark.parametrize(("kind", "message"), [
    ("wrong_n_embd", "n_embd 32"), ("nan", "bad.gguf: tensor 'direction.2': direction has 1 non-finite values"),
    ("not_gguf", "uploaded vector 'bad'"), ("too_big", "larger than 4096 bytes")])
def test_a_bad_upload_gets_400_and_leaves_the_directory_unchanged(server_model, vector_dir, vectors, tmp_path, kind,
                                                                  message):
    config = ServerConfig(max_batch=2, max_vector_file_bytes=4096)
    content = {"wrong_n_embd": lambda: gguf_bytes(tmp_path, make_vector(32, 1)),
               "nan": lambda: nan_vector_bytes(tmp_path),
               "not_gguf": lambda: b"GGUF but not really" * 3, "too_big": lambda: b"\0" * 5000}[kind]()
    before = directory_state(vector_dir)
    with serving(server_model, vector_dir, config) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        response = c.put("/v1/vectors/bad", content=content)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]
        assert "bad" not in [v["id"] for v in c.get("/v1/vectors").json()["data"]]
    assert directory_state(vector_dir) == before


def test_bad_vector_names_are_refused(client, tmp_path, vector_dir):
    before = directory_state(vector_dir)
    for name in ("..", ".hidden", "a.gguf", "x" * 65, "with space"):
        response = client.put(f"/v1/vectors/{name}", content=gguf_bytes(tmp_path, make_vector(48, 1)))
        assert response.status_code in (400, 404, 405), name
    assert directory_state(vector_dir) == before


def test_unload_load_and_rescan(client, reference, vectors, vector_dir):
    client.post("/v1/steering", json={"steering": {"happy": 0.5, "honest": 0.3}})
    assert client.delete("/v1/vectors/happy").json()["deleted"] is True
    assert (vector_dir / "happy.gguf").exists()  # unloading keeps the file
    assert client.post("/v1/completions", json={"prompt": "x", "steering": {"happy": 1}}).status_code == 400
    assert client.get("/v1/steering").json()["steering"] == {"honest": 0.3}  # the default forgets it too
    assert client.delete("/v1/vectors/happy").status_code == 404
    (vector_dir / "sub").mkdir()
    make_vector(48, 40).save(vector_dir / "sub" / "kind.gguf")
    assert client.post("/v1/vectors/load", json={"path": "sub/kind.gguf"}).json()["id"] == "kind"
    kind = ControlVector.load(vector_dir / "sub" / "kind.gguf")
    assert complete(client, {"kind": 0.5}) == intervened_text(reference, [reference.intervention(kind, 0.5)])
    make_vector(48, 41).save(vector_dir / "fresh.gguf")
    os.remove(vector_dir / "plain.gguf")
    make_vector(32, 2).save(vector_dir / "small.gguf")
    scan = client.post("/v1/vectors/rescan", json={}).json()
    assert scan["added"] == ["fresh", "happy"] and scan["removed"] == ["plain"]
    assert [e["file"] for e in scan["errors"]] == ["small.gguf"] and "n_embd 32" in scan["errors"][0]["error"]
    assert sorted(v["id"] for v in client.get("/v1/vectors").json()["data"]) == ["fresh", "happy", "honest", "kind"]


def test_unloading_a_vector_does_not_disturb_a_request_using_it(client, reference, vectors):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 400, "steering": {"happy": 0.9}, "stream": True}
    unloaded = threading.Event()
    pieces = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                if not unloaded.is_set():
                    assert client.delete("/v1/vectors/happy").status_code == 200
                    unloaded.set()
    assert unloaded.is_set() and len(pieces) > 3
    assert "".join(pieces) == expected_text(reference, vectors, PROMPT, {"happy": 0.9}, max_tokens=400)


def test_overwriting_a_vector_keeps_the_default_usable(client, reference, tmp_path):
    assert client.post("/control-vectors/load",
                       json={"path": "honest.gguf", "layer_start": 2, "layer_end": 2}).json()["success"]
    only_layer_1 = ControlVector({1: np.ones(48, np.float32)}, "llama", {"unit": "gap"})
    assert client.put("/v1/vectors/honest?overwrite=true",
                      content=gguf_bytes(tmp_path, only_layer_1)).status_code == 201
    # the default named layer 2, which the new file lacks: it is dropped, not left to fail every request
    assert client.get("/v1/steering").json()["steering"] == {}
    assert complete(client) == intervened_text(reference, [])


def test_ik_apply_turns_off_entries_set_in_ggsteers_shape(client, reference, vectors):
    client.post("/v1/steering", json={"steering": {"honest": {"op": "ablate", "layers": "1-2"}, "happy": 0.5}})
    listed = client.get("/control-vectors").json()
    assert [(v["path"], v["scale"], v["applied"]) for v in listed] == [("honest.gguf", 0.0, True),
                                                                      ("happy.gguf", 0.5, True)]
    assert client.post("/control-vectors/apply", json=[{"id": 1, "scale": 0.25}]).json() == {"success": True}
    assert [v["applied"] for v in client.get("/control-vectors").json()] == [False, True]
    assert complete(client) == expected_text(reference, vectors, PROMPT, {"happy": 0.25})
