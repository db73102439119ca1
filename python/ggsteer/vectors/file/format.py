"""Control-vector files: GGUF files that llama.cpp loads with ``--control-vector``.

Layer convention
----------------
ggsteer's layer ``i`` is the output of transformer block ``i`` (0-based), the tensor llama.cpp
names ``l_out-i`` in its graph. In a file, tensor ``direction.N`` is what llama.cpp adds to
``l_out-N``, so by default ``read_vector_file`` returns it as layer ``N``. This was checked in
llama.cpp's sources:

* ``common/common.cpp``, ``common_control_vector_load_one``: ``direction.N`` is summed into a flat
  buffer at offset ``n_embd * (N - 1)``; ``common_control_vector_load`` adds files together.
* ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: for ``il`` in ``1 .. n_layer - 1``,
  ``tensors[il]`` is filled from offset ``n_embd * (il - 1)``; ``init`` never makes a tensor for
  block 0, and directions with ``N >= n_layer`` are silently ignored.
* ``src/models/*.cpp``: ``cur = build_cvec(cur, il); cb(cur, "l_out", il);`` adds
  ``tensors[il]`` to the output of block ``il``. Chaining the three: ``direction.N -> l_out-N``.

Block 0 cannot be addressed by a file, so ``write_vector_file`` refuses layer 0.

Where files come from
---------------------
* repeng's ``ControlVector.export_gguf`` writes ``direction.<layer>`` with repeng's layer ids,
  which are block indices too (``batched_get_hiddens`` reads ``hidden_states[layer + 1]``, the
  output of block ``layer``), so its files load with the default ``layer_offset=0``.
* llama.cpp's ``tools/cvector-generator/cvector-generator.cpp`` captures every ``l_out-*`` tensor
  in graph order from ``cb_eval``. The last block's ``l_out`` only holds the output rows, so it
  fails the ``ne[1] == n_tokens`` filter; the ``n_layer - 1`` captured vectors are therefore
  ``l_out-0 .. l_out-(n_layer-2)``. ``pca.hpp`` / ``mean.hpp`` name vector ``il`` (measured at
  ``l_out-il``) ``direction.(il + 1)`` and ``export_gguf`` writes ``controlvector.layer_count`` as an
  int32. llama.cpp thus applies each of its directions one block later than where it was
  measured. Files load with llama.cpp's application semantics (layer ``N``) by default;
  ``read_vector_file(path, layer_offset=-1)`` moves them back to where they were measured.

File format
-----------
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (str),
``controlvector.layer_count`` (uint32) and one F32 1-D tensor ``direction.<N>`` per layer, written
in ascending layer order. llama.cpp reads only the tensors: its loader rejects a whole file when a
tensor name is not ``direction.<N>`` with ``N >= 1``, a tensor is not F32, not 1-D (by
``ggml_n_dims``, so trailing dimensions of 1 are allowed) or differs in length from the first.
ggsteer adds its own keys under ``ggsteer.`` (llama.cpp ignores unknown keys); see ``METADATA_KEYS``.

Decisions
---------
* Reading is stricter than llama.cpp where llama.cpp is lenient: ``general.architecture`` must
  be ``controlvector``; tensor names must be exactly ``direction.<integer>`` (llama.cpp's
  ``std::stoi`` would also take ``direction.1abc``); two tensors for one layer (e.g.
  ``direction.01`` and ``direction.1``, which llama.cpp would add) are refused; NaN/Inf and empty
  directions are refused.
* ``controlvector.layer_count`` is not used by llama.cpp, so a value that differs from the number of
  tensors only warns (``VectorFileWarning``); a missing ``controlvector.model_hint`` warns and reads
  as ``""``.
* A ``layer_offset`` that moves a direction to layer 0 is allowed in memory (ggsteer's own hooks can
  steer block 0) but such a file cannot be written back; a result below 0 is an error.
* ``gguf.GGUFReader`` trusts the length fields: an array length larger than the file makes it read
  empty slices past the end forever (a corrupted file hangs it and grows memory without bound),
  and a slightly too large one makes it return empty items silently. Before handing a file to it,
  ``scan_gguf_layout`` walks the header with every count and length checked against the bytes
  actually left, and also applies the structural rules of ggml's C parser (``ggml/src/gguf.cpp``,
  which llama.cpp's loader uses): no nested arrays, no empty keys, tensor names under 64 bytes,
  at most 4 dimensions, tensor data back to back at the alignment and inside the file.
  Big-endian files are refused (llama.cpp cannot load them either).
* Metadata is a plain dict. Keys in ``METADATA_KEYS`` are type-checked on writing and reading and
  stored with fixed GGUF types; their floats are float32, so they read back as the float32 values
  (as Python floats). Other keys are accepted for forward compatibility (and kept when reading)
  with lossless types (INT64, FLOAT64, STRING, BOOL, arrays of one of them). Files hold the layers
  in ascending order; per-layer values given in another order (``metadata["layers"]``) are reordered.
* ``write_vector_file`` checks ``overwrite=False`` before writing and again just before
  ``os.replace``; a file created in between these two moments by another process would still be
  replaced (``os.replace`` has no "fail if exists" mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = "controlvector.model_hint"
LAYER_COUNT_KEY = "controlvector.layer_count"
GGSTEER_PREFIX = "ggsteer."
FORMAT_VERSION = 1

DIRECTION_NAME = re.compile(r"direction\.(-?[0-9]+)")
INT32_MAX = 2**31 - 1


class VectorFileError(ValueError):
    """A control-vector file (or the data given to write one) is invalid."""


class VectorFileWarning(UserWarning):
    """Something in a control-vector file is odd but llama.cpp would still load it."""


@dataclass(eq=False)  # eq=False: comparing dicts of numpy arrays with == is ambiguous
class VectorFile:
    """A control vector as read from a file.

    directions: layer -> float32 [n_embd] (layer i = output of block i), sorted by layer.
    model_hint: the model architecture the vector was made for, e.g. "llama", "gemma3".
    metadata: the ggsteer keys without their "ggsteer." prefix (see METADATA_KEYS).
    source: "ggsteer" if the file has ggsteer keys, else "external".
    """

    directions: dict[int, np.ndarray]
    model_hint: str
    metadata: dict[str, object] = field(default_factory=dict)
    source: str = "external"

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    def per_layer(self, key: str) -> dict[int, float]:
        """A per-layer metadata array ("separation", "gap", "residual_norm") as layer -> value."""
        values = self.metadata.get(key)
        if values is None:
            return {}
        layers = self.metadata.get("layers", list(self.directions))
        return dict(zip(layers, values, strict=True))  # type: ignore[arg-type]
