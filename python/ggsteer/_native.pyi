"""ggsteer's native eval-callback hooks on llama.cpp's compute graph (csrc/bindings.cpp)."""

from typing import Final

import numpy as np
import numpy.typing as npt

OP_KINDS: Final[tuple[str, str, str, str]]
"""Names of the op kinds, indexed by kind: add, ablate, clamp, add_normalized."""
CUDA_COMPILED: Final[bool]
"""Whether the CUDA intervention kernels were compiled into this build."""

class Hook:
    """State of the eval callback installed on one llama_context."""

    def __init__(self, n_layer: int, n_embd: int) -> None:
        """A hook for a model with `n_layer` blocks of width `n_embd` (both positive)."""
    @property
    def callback_address(self) -> int:
        """Address of the C callback, for llama_context_params.cb_eval."""
    @property
    def user_data_address(self) -> int:
        """Address of this hook's state, for cb_eval_user_data."""
    @property
    def n_layer(self) -> int:
        """Number of blocks the hook was made for."""
    @property
    def n_embd(self) -> int:
        """Width of a residual-stream row."""
    @property
    def intervening(self) -> bool:
        """Whether a program with ops or conditions is installed."""
    def set_stop_after(self, layer: int) -> None:
        """End every following decode right after l_out-<layer> (-1: run whole graphs); the later blocks'
        KV cells stay unwritten."""
    @property
    def stop_after(self) -> int:
        """The layer every decode ends after, or -1."""
    @property
    def stopped_at(self) -> int:
        """The layer the last described decode stopped at, or -1."""
    def set_capture(
        self,
        layers: list[int],
        rows: npt.ArrayLike,
        out_rows: npt.ArrayLike,
        n_tokens: int,
        n_outputs: int,
        out: npt.NDArray[np.float32],
    ) -> None:
        """Plan the copy of `rows` of each layer's l_out into `out` [len(rows), len(layers), n_embd] during the
        next decode."""
    def finish_capture(self) -> list[int]:
        """End the capture; return per-layer copy counts, raise RuntimeError on a capture error."""
    def set_program(
        self,
        ops: npt.ArrayLike,
        coeffs: npt.ArrayLike,
        vector_offsets: npt.ArrayLike,
        condition_layers: npt.ArrayLike,
        condition_thresholds: npt.ArrayLike,
        condition_offsets: npt.ArrayLike,
        vectors: npt.ArrayLike,
        n_slots: int,
    ) -> None:
        """Install interventions: ops int32 [n, 8] (kind, layer, slot, when, first_k, condition, n_vector_rows,
        skip_first)."""
    def clear_program(self) -> None:
        """Remove every intervention."""
    def set_rows(
        self, slots: npt.ArrayLike, positions: npt.ArrayLike, generated: npt.ArrayLike, output_rows: npt.ArrayLike
    ) -> None:
        """Start a decode: describe its rows (sequence slot, position, phase, outputs); drop a stale error."""
    def clear_rows(self) -> None:
        """End the decode: record an error unless each steered layer was seen once; forget the rows."""
    def take_error(self) -> str:
        """The first error met by the callback since the last call, or ''."""
    def condition_states(self) -> list[int]:
        """Per (condition, slot): 1 when the condition holds."""
    def counts(self) -> dict[str, int]:
        """Totals since creation: op applications per path (host_kernel, cuda_kernel, copy_path) and row_transfers."""
    def set_host_as_device(self, on: bool) -> None:
        """Testing: handle host buffers through the transfer paths of other backends."""

def layer_of_name(name: str) -> int:
    """Layer index parsed from a graph tensor name like 'l_out-3', or -1."""

def apply_op_cpu(kind: int, data: npt.NDArray[np.float32], vectors: npt.ArrayLike, coeff: float) -> None:
    """Apply op `kind` in place to each row of `data` with the matching row of `vectors` (CPU kernel)."""

def apply_op_cuda(kind: int, data: npt.NDArray[np.float32], vectors: npt.ArrayLike, coeff: float) -> None:
    """Apply op `kind` like apply_op_cpu, through the CUDA kernel on device copies (CUDA builds only)."""

def cuda_device_available() -> bool:
    """Whether a CUDA device is visible (never in a build without CUDA)."""

def watch_rpc_workers(endpoints: list[str], exit_code: int) -> None:
    """Turn ggml-rpc's abort on a lost worker into one line naming it and _exit(exit_code)."""

def watch_rpc_notify(fds: list[int], grace_ms: int) -> None:
    """Server mode: also write the lost worker's line to these fds and wait grace_ms before _exit."""

def build_info() -> dict[str, str]:
    """The llama-cpp-python version, header fingerprint and CUDA architectures of this build."""
