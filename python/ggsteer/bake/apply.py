"""bake_model: write a copy of a model GGUF whose weights carry the steering."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from ggsteer.bake import edits, quant
from ggsteer.bake.architectures import architecture_for
from ggsteer.bake.gguf_layout import GGUFLayout, ModelFileError, TensorInfo, read_layout
from ggsteer.bake.gguf_rewrite import AddedTensor, copy_producer, write_model_gguf
from ggsteer.bake.metadata import PREFIX, bake_records
from ggsteer.bake.plan import BakedOp, BakeError, BakeRequest, EditPlan, Planner, format_layers
from ggsteer.vectors import ControlVector

_EMBEDDING_ROWS_PER_CHUNK = 8192  # rows of the token embedding edited at a time (memory stays small)


@dataclass
class BakeReport:
    output: Path
    architecture: str
    operations: list[BakedOp]
    edited_tensors: list[str]
    added_tensors: list[str]
    input_bytes: int
    output_bytes: int
    seconds: float

    @property
    def exact(self) -> bool:
        return all(op.exact for op in self.operations)

    def summary(self) -> str:
        lines = [f"wrote {self.output} ({self.output_bytes / 1e6:.1f} MB, input {self.input_bytes / 1e6:.1f} MB) "
                 f"in {self.seconds:.1f} s"]
        for op in self.operations:
            value = "" if op.value is None else f" {op.value:g}"
            kind = "exact" if op.exact else "approximate: " + "; ".join(op.reasons)
            projection = f", {op.projection} projection" if op.projection else ""
            lines.append(f"  {op.op}{value} at layers {format_layers(list(op.layers))}{projection}: "
                         f"{op.method} ({kind})")
        lines.append(f"  {len(self.edited_tensors)} tensors edited (each in its own type), "
                     f"{len(self.added_tensors)} added")
        return "\n".join(lines)


def bake_model(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    add: Iterable[tuple[ControlVector, float]] = (),
    ablate: Iterable[ControlVector] = (),
    clamp: Iterable[tuple[ControlVector, float]] = (),
    layers: Sequence[int] | None = None,
    approximate: bool = False,
    force: bool = False,
) -> BakeReport:
    """Write `output`: the model at `model_path` with the steering built into its weights.

    `add` pairs are (vector, strength) as in `SteeredModel.set_control`; `ablate` vectors are
    projected out relative to their stored center; `clamp` pairs hold the projection at center +
    value gaps. `layers` defaults to each vector's recommended layers. A bake that cannot equal
    runtime steering on this architecture is refused unless `approximate=True`. Nothing is written
    when anything is wrong; an existing `output` is replaced only with `force=True`.
    """
    started = time.perf_counter()
    output = Path(output)
    layout = _open_model(model_path, output, force)
    arch = architecture_for(layout.architecture)
    n_embd, n_layer = int(layout.hparam("embedding_length", 0)), int(layout.hparam("block_count", 0))
    requests = _requests(add, ablate, clamp, layers, n_embd, n_layer, layout.path)
    planner = Planner(layout, arch, n_embd, n_layer, approximate)
    # llama.cpp adds the adapter's vector inside the graph before the hook edits l_out: adds first
    baked = [planner.add(r) for r in requests if r.op == "add"]
    baked += [planner.project(r) for r in requests if r.op != "add"]
    replaced, added = _producers(layout, planner.plan, n_embd)
    records = {k: v for k, v in layout.records.items()}
    records.update(bake_records(baked, _version()))
    write_model_gguf(layout, output, replaced=replaced, added=added, records=records, overwrite=force)
    return BakeReport(output, arch.name, baked, sorted(replaced), [a.info.name for a in added],
                      os.path.getsize(layout.path), os.path.getsize(output), time.perf_counter() - started)


def _open_model(model_path, output: Path, force: bool) -> GGUFLayout:
    layout = read_layout(model_path)
    if layout.architecture == "controlvector":
        raise ModelFileError(f"{model_path}: is a control-vector file, not a model "
                             "(pass it as --vector/--ablate/--clamp)")
    if not layout.architecture:
        raise ModelFileError(f"{model_path}: has no general.architecture: not a llama.cpp model file")
    if any(key.startswith(PREFIX) for key in layout.records):
        raise BakeError(f"{model_path}: already has baked steering; bake from the original model")
    if output.exists() and output.resolve() == Path(model_path).resolve():
        raise FileExistsError(f"{output}: the output would overwrite the model it is baked from")
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists; pass force=True (--force) to replace it")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: the output's folder does not exist")
    return layout


def _requests(add, ablate, clamp, layers, n_embd: int, n_layer: int, path: str) -> list[BakeRequest]:
    requests = [BakeRequest("add", v, float(s), ()) for v, s in add]
    requests += [BakeRequest("ablate", v, None, ()) for v in ablate]
    requests += [BakeRequest("clamp", v, float(s), ()) for v, s in clamp]
    if not requests:
        raise BakeError("nothing to bake: give at least one add, ablate or clamp vector")
    checked = []
    for request in requests:
        vector = request.vector
        if not isinstance(vector, ControlVector):
            raise TypeError(f"{request.op}: expected a ControlVector, got {type(vector).__name__}")
        if vector.n_embd != n_embd:
            raise BakeError(f"{request.op}: vector has n_embd {vector.n_embd} but {path} has n_embd {n_embd}: "
                            f"it was made for another model ({vector.model_hint or 'unknown'})")
        chosen = _layers_for(vector, layers, n_layer)
        checked.append(BakeRequest(request.op, vector, request.strength, tuple(chosen)))
    return checked


def _layers_for(vector: ControlVector, layers, n_layer: int) -> list[int]:
    chosen = sorted({int(il) for il in layers}) if layers is not None else \
        [il for il in (_tuned_layers(vector) or vector.recommended_layers or vector.layers) if il in vector.directions]
    if not chosen:
        raise BakeError("no layers to bake")
    beyond = [il for il in chosen if not 0 <= il < n_layer]
    if beyond:
        raise BakeError(f"layers {beyond} are beyond the model: it has layers 0..{n_layer - 1}")
    missing = [il for il in chosen if il not in vector.directions]
    if missing:
        raise BakeError(f"layers {missing} are not in the vector (it has {format_layers(vector.layers)})")
    return chosen


def _producers(layout: GGUFLayout, plan: EditPlan, n_embd: int):
    replaced, added = {}, []
    for name, directions in plan.writer_steps.items():
        replaced[name] = _writer_producer(layout, _writable(layout.tensors[name]), directions)
    for name, steps in plan.reader_steps.items():
        replaced[name] = _reader_producer(layout, _writable(layout.tensors[name]), steps)
    if plan.embedding_steps:
        original = _writable(layout.tensors["token_embd.weight"])
        replaced[original.name] = _embedding_producer(layout, original, plan.embedding_steps)
        if "output.weight" not in layout.tensors:
            # a tied head would read the orthogonalised embeddings: give it the original ones
            head = TensorInfo("output.weight", original.ne, original.ggml_type, 0, original.n_bytes)
            added.append(AddedTensor(head, copy_producer(layout, original)))
    for name, values in plan.biases.items():
        data = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        if name in layout.tensors and layout.tensors[name].ggml_type == GGMLQuantizationType.F32:
            replaced[name] = lambda data=data: [data]
        elif name in layout.tensors:
            info = layout.tensors[name]
            replaced[name] = lambda v=values, t=info.ggml_type: [quant.encode_tensor(v, t)]
        else:
            added.append(AddedTensor(TensorInfo(name, (n_embd,), GGMLQuantizationType.F32, 0, 4 * n_embd),
                                     lambda data=data: [data]))
    return replaced, added


def _writable(info: TensorInfo) -> TensorInfo:
    if quant.can_encode(info.ggml_type):
        return info
    raise BakeError(f"tensor {info.name} has type {info.ggml_type.name}, which ggsteer cannot write back")


def _writer_producer(layout, info: TensorInfo, directions):
    def produce():
        weight = quant.read_tensor(layout, info)
        for w in directions:
            weight = edits.orthogonalise_writer(weight, w)
        yield quant.encode_tensor(weight, info.ggml_type)
    return produce


def _reader_producer(layout, info: TensorInfo, steps):
    def produce():
        weight = quant.read_tensor(layout, info)
        for a, b in steps:
            weight = edits.project_reader(weight, a, b)
        yield quant.encode_tensor(weight, info.ggml_type)
    return produce


def _embedding_producer(layout, info: TensorInfo, steps):
    def produce():
        for first in range(0, info.n_rows, _EMBEDDING_ROWS_PER_CHUNK):
            rows = quant.read_rows(layout, info, first, min(_EMBEDDING_ROWS_PER_CHUNK, info.n_rows - first))
            for vector in steps:
                rows = edits.orthogonalise_rows(rows, vector)
            yield quant.encode_tensor(rows, info.ggml_type)
    return produce


def _version() -> str:
    from ggsteer import __version__

    return __version__


def _tuned_layers(vector: ControlVector) -> list[int] | None:
    """The tuned layers when the tuned settings are plain addition (the only op a bake adds)."""
    tuned = vector.tuned_addition
    return None if tuned is None else tuned.layers
