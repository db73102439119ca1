"""Turn bake requests (add / ablate / clamp a ControlVector) into per-tensor edits.

Runtime semantics being baked (ggsteer.steering.interventions): `add` adds s * v_i to layer i's output;
`ablate` sets the projection on u_i = v_i / |v_i| to the stored center c_i (0 without one); `clamp`
sets it to c_i + s * |v_i|.

- add: exact wherever the architecture has a residual bias (llama: `blk.i.ffn_down.bias`); refused
  elsewhere, even approximately (see add()).
- ablate / clamp: the token embeddings and every steered block's writers are orthogonalised, so no
  write carries u; where the attention-output bias reaches the residual, block i's bias carries the
  step t_i - t_(i-1) of the targets (centered projection). The baked model then equals projecting u
  out of the embeddings and holding the projection at t_i after each sublayer of block i (after the
  attention and after the FFN, as abliteration's equivalence has it), when the residual never gets u
  from an unedited writer: one direction for all the layers, and the layers running from 0.
  The hook acts only on block outputs (l_out-i), so the FFN of a hooked block still reads the
  attention's u component: the hook and the bake differ by that (measured in the bake's docs).
  Otherwise (approximate) each steered block stops writing along its own layer's direction (plain
  projection), as abliteration does with per-layer directions; on post-norm architectures (Gemma 3),
  where a writer edit also rescales the rest of the write, the block after each steered layer i
  reads the residual without u_i instead (Architecture.readers): the attention values of block
  i + 1 see layer i's output with nothing along u_i, the sink included, which u_i does not point
  along (vectors/projection.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ggsteer.bake import edits
from ggsteer.bake.architectures import WRITERS, Architecture
from ggsteer.bake.gguf_layout import GGUFLayout
from ggsteer.bake.quant import read_tensor
from ggsteer.steering.options import BAKE_OPS, OptionError, parse_strength
from ggsteer.vectors import ControlVector
from ggsteer.vectors.projection import projection_for_layer

_PARALLEL = 1.0 - 1e-6  # cosine above which two layers' directions count as one


class BakeError(ValueError):
    """A bake that cannot be done as asked (one line: what, where, and what to pass instead)."""


@dataclass(frozen=True)
class BakeRequest:
    """One steering entry to bake: its fields are the steering options a bake can hold
    (steering/options.py; weights act on every position, so when, first_k, skip_first and
    condition have no baked form)."""

    op: str  # "add", "ablate" or "clamp"
    vector: ControlVector
    strength: float | None  # strength for add, clamp value (in gaps), None for ablate
    layers: tuple[int, ...]

    def __post_init__(self):
        if self.op not in BAKE_OPS:
            raise BakeError(f"cannot bake op {self.op!r}: choose one of {', '.join(BAKE_OPS)}")
        if self.strength is not None:
            try:
                object.__setattr__(self, "strength", parse_strength(self.strength, bounded=False))
            except OptionError as error:
                raise BakeError(f"{self.op}: {error}") from None


@dataclass
class BakedOp:
    """What one request became in the file."""

    op: str
    layers: tuple[int, ...]
    value: float | None
    vector_hash: str
    exact: bool
    projection: str  # "centered", "plain", or "" for add
    method: str  # where the edit went
    reasons: list[str] = field(default_factory=list)  # why it is not exact


@dataclass
class EditPlan:
    """Edits per tensor, applied in order: writers' directions to project out, embedding row steps, biases."""

    writer_steps: dict[str, list[np.ndarray]] = field(default_factory=dict)
    embedding_steps: list[np.ndarray] = field(default_factory=list)  # unit vectors to project out, in order
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    reader_steps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # (a, b): W - (W a) b^T


class Planner:
    def __init__(self, layout: GGUFLayout, arch: Architecture, n_embd: int, n_layer: int, approximate: bool):
        self.layout, self.arch, self.n_embd, self.n_layer = layout, arch, n_embd, n_layer
        self.approximate = approximate
        self.plan = EditPlan()

    # -- requests -------------------------------------------------------------------------
    def add(self, request: BakeRequest) -> BakedOp:
        deltas = {il: np.float64(request.strength) * request.vector.directions[il].astype(np.float64)
                  for il in request.layers}
        baked = BakedOp("add", request.layers, request.strength, vector_hash(request.vector, request.layers), True,
                        "", "")
        if self.arch.residual_bias:
            for il, delta in deltas.items():
                name = f"blk.{il}.{self.arch.residual_bias}"
                self.plan.biases[name] = (self._bias(name).astype(np.float64) + delta).astype(np.float32)
            baked.method = f"added to blk.N.{self.arch.residual_bias}"
            return baked
        # no approximate add either: on Gemma 3 an offset on the token embeddings (the only entry into the
        # residual stream that is not normalised) did nothing with layer 3's vector and broke the text with
        # the sum of layers 3-14 (benchmarks/bake_quality.py, docs/baking.md)
        raise BakeError(f"cannot bake add into {self.arch.name}: {self.arch.add_limit}; steer it at run time "
                        "(ggsteer generate/serve, or llama.cpp's --control-vector)")

    def project(self, request: BakeRequest) -> BakedOp:
        vector, layers = request.vector, request.layers
        # the direction and projection the hook's ablate/clamp use: with training's statistics, the
        # direction without the ones every token shares (which the attention sink is made of)
        fits = {il: projection_for_layer(vector, il, request.op, request.strength) for il in layers}
        units = {il: edits.unit(direction.astype(np.float64)) for il, (direction, _) in fits.items()}
        targets = {il: float(target) for il, (_, target) in fits.items()}
        reasons = self._projection_limits(units, targets)
        exact = not reasons
        centered = exact and any(t != 0.0 for t in targets.values())
        baked = BakedOp(request.op, layers, request.strength, vector_hash(vector, layers), exact,
                        "centered" if centered else "plain", "", reasons)
        self._require_approximate(baked)
        if request.op == "clamp" and not exact:
            # a plain projection would hold it at 0, not at the value asked for: that is ablate, not clamp
            raise BakeError(f"cannot bake clamp into {self.arch.name} even approximately: {'; '.join(reasons)} "
                            "(bake --ablate for the plain projection)")
        if not exact:
            baked.method = (self._project_readers(layers, units) if self.arch.readers
                            else self._project_span(layers, units))
            return baked
        self.plan.embedding_steps.append(units[0])
        previous = 0.0
        for il in layers:
            step = targets[il] - previous if centered else 0.0
            previous = targets[il]
            self._project_block(il, [units[il]], step)
        baked.method = "token embeddings and steered blocks' writers orthogonalised"
        return baked

    def _project_span(self, layers: tuple[int, ...], units: dict[int, np.ndarray]) -> str:
        """Nothing written before a steered layer i may point along u_i: each block j <= max(layers) is
        orthogonalised against {u_i : i >= j}, the embeddings against all of them."""
        for block in range(max(layers) + 1):
            self._project_block(block, [units[il] for il in layers if il >= block], 0.0)
        blocks = f"blocks 0-{max(layers)}" if max(layers) else "block 0"
        if "output.weight" in self.layout.tensors:
            for q in edits.orthonormal_basis([units[il] for il in layers], None):
                self.plan.embedding_steps.append(q)
            return (f"writers of {blocks} and the token embeddings orthogonalised against the later steered "
                    "layers' directions")
        # a tied output head would need its own copy of the embeddings (the file would grow by that much)
        return (f"writers of {blocks} orthogonalised against the later steered layers' directions "
                "(token embeddings kept: they are the tied output head)")

    def _project_readers(self, layers: tuple[int, ...], units: dict[int, np.ndarray]) -> str:
        """The projections of block i + 1 read layer i's output without u_i (one direction per block:
        hiding every earlier layer's direction from each block broke Gemma's text; docs/baking.md)."""
        for il in layers:
            if il + 1 >= self.n_layer:
                raise BakeError(f"layer {il} is read only by the output head, which {self.arch.name} ties to the token "
                                f"embeddings: bake layers up to {self.n_layer - 2}, or steer layer {il} at run time")
            for norm_name, readers in self.arch.readers:
                norm = read_tensor(self.layout, self._tensor(f"blk.{il + 1}.{norm_name}.weight"))
                step = edits.reader_projection(units[il], norm)
                for reader in readers:
                    name = f"blk.{il + 1}.{reader}.weight"
                    self._tensor(name)
                    self.plan.reader_steps.setdefault(name, []).append(step)
        readers = ", ".join(reader for _, names in self.arch.readers for reader in names)
        return f"the {readers} projections of the block after each steered layer read it without that layer's direction"

    def _tensor(self, name: str):
        if name not in self.layout.tensors:
            raise BakeError(f"{self.layout.path}: tensor {name} is missing (mixture-of-experts blocks cannot be baked)")
        return self.layout.tensors[name]

    # -- pieces ---------------------------------------------------------------------------
    def _projection_limits(self, units: dict[int, np.ndarray], targets: dict[int, float]) -> list[str]:
        if self.arch.readers:  # post-norm writes: no writer edit holds a projection, whatever the layers
            return [f"{self.arch.name} normalises each block's writes, so the next block's readers are edited instead: "
                    "the residual stream, the other readers, later blocks and the output head still see the direction"]
        layers = sorted(units)
        reasons = []
        if layers != list(range(layers[-1] + 1)):
            reasons.append(f"layers {format_layers(layers)} do not start at 0, so unedited blocks still write "
                           "along the direction")
        first = units[layers[0]]
        if any(float(units[il] @ first) < _PARALLEL for il in layers):
            reasons.append("the vector's direction differs between layers, so no single direction can be kept out")
        if any(t != 0.0 for t in targets.values()) and not self.arch.projection_bias:
            reasons.append(f"{self.arch.name} has no residual bias to hold the centered offset (plain projection)")
        return reasons

    def _project_block(self, il: int, directions: list[np.ndarray], step: float) -> None:
        """Block il's writers stop writing along `directions`; with one direction, its bias holds `step`."""
        for k, writer in enumerate(WRITERS):
            name = f"blk.{il}.{writer}.weight"
            self._tensor(name)
            norm = None
            if self.arch.post_norms:
                norm = read_tensor(self.layout, self.layout.tensors[f"blk.{il}.{self.arch.post_norms[k]}.weight"])
            # one direction keeps its sign (the bias offset points along it); several become an orthonormal basis
            basis = [edits.writer_direction(directions[0], norm)] if len(directions) == 1 else \
                edits.orthonormal_basis(directions, norm)
            self.plan.writer_steps.setdefault(name, []).extend(basis)
            bias_name = f"blk.{il}.{writer}.bias"
            holds_offset = self.arch.projection_bias == f"{writer}.bias"
            if bias_name in self.layout.tensors or bias_name in self.plan.biases or (holds_offset and step):
                bias = self._bias(bias_name)
                for w in basis:
                    bias = edits.project_bias(bias, w, step if holds_offset and w is basis[0] else 0.0)
                self.plan.biases[bias_name] = bias

    def _bias(self, name: str) -> np.ndarray:
        if name in self.plan.biases:
            return self.plan.biases[name]
        if name in self.layout.tensors:
            return read_tensor(self.layout, self.layout.tensors[name]).reshape(-1)
        return np.zeros(self.n_embd, dtype=np.float32)

    def _require_approximate(self, baked: BakedOp) -> None:
        if not baked.exact and not self.approximate:
            raise BakeError(
                f"cannot bake {baked.op} exactly into {self.arch.name}: {'; '.join(baked.reasons)} "
                "(pass approximate=True / --approximate for the nearest edit)"
            )


def vector_hash(vector: ControlVector, layers) -> str:
    digest = hashlib.sha256()
    for il in layers:
        digest.update(int(il).to_bytes(4, "little"))
        digest.update(np.ascontiguousarray(vector.directions[il], dtype="<f4").tobytes())
    return digest.hexdigest()[:16]


def format_layers(layers: list[int]) -> str:
    runs: list[list[int]] = []
    for il in sorted(layers):
        if runs and il == runs[-1][-1] + 1:
            runs[-1].append(il)
        else:
            runs.append([il])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
