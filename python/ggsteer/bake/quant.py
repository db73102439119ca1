"""Tensor bytes <-> float32 arrays, in the tensor's own ggml type.

Dequantizing uses gguf-py (numpy). Quantizing uses ggml's own `ggml_quantize_chunk` from the
libggml-base that llama-cpp-python ships, so a Q4_K or Q6_K tensor is written back in its own type
exactly as llama.cpp's quantizer would; gguf-py's numpy quantizers are the fallback (they cannot
write the K types).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from ggsteer.bake.gguf_layout import GGUFLayout, TensorInfo
from ggsteer.runtime.ggml_libs import ggml_quantize_chunk

_FLOAT_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def read_rows(layout: GGUFLayout, info: TensorInfo, first: int = 0, count: int | None = None) -> np.ndarray:
    """Rows [first, first + count) of the tensor as float32, shape (count, ne[0])."""
    count = info.n_rows - first if count is None else count
    row_bytes = info.n_bytes // info.n_rows
    with open(layout.path, "rb") as handle:
        handle.seek(layout.data_start + info.offset + first * row_bytes)
        raw = np.frombuffer(handle.read(count * row_bytes), dtype=np.uint8).reshape(count, row_bytes)
    if info.ggml_type in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[info.ggml_type]).astype(np.float32)
    return quants.dequantize(raw, info.ggml_type).astype(np.float32).reshape(count, info.row_length)


def read_tensor(layout: GGUFLayout, info: TensorInfo) -> np.ndarray:
    """The whole tensor as float32, numpy shape reversed from ggml's ne (last axis = ne[0])."""
    return read_rows(layout, info).reshape(tuple(reversed(info.ne)))


def encode_tensor(values: np.ndarray, ggml_type: GGMLQuantizationType) -> bytes:
    """float32 values (last axis = row) in `ggml_type`'s bytes."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type in _FLOAT_DTYPES:
        return values.astype(_FLOAT_DTYPES[ggml_type]).tobytes()
    quantize = ggml_quantize_chunk()
    if quantize is None:
        return quants.quantize(values, ggml_type).tobytes()
    n_per_row = values.shape[-1]
    n_rows = values.size // n_per_row
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    out = np.empty(n_rows * (n_per_row // block) * type_size, dtype=np.uint8)
    written = quantize(int(ggml_type), values.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    if written != out.size:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {ggml_type.name}, expected {out.size}")
    return out.tobytes()


def can_encode(ggml_type: GGMLQuantizationType) -> bool:
    if ggml_type in _FLOAT_DTYPES:
        return True
    if ggml_quantize_chunk() is not None:
        return ggml_type not in _NEEDS_IMATRIX
    return ggml_type in _GGUF_PY_WRITABLE


# ggml refuses these without an importance matrix, which a bake does not have
_NEEDS_IMATRIX = {GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ1_S,
                  GGMLQuantizationType.IQ1_M, GGMLQuantizationType.IQ2_S}
_GGUF_PY_WRITABLE = {GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                     GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0}
