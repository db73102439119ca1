"""Where each architecture's graph (llama.cpp src/models/<arch>.cpp) lets a weight edit equal steering.

A block's output (`l_out-i`) is `residual + attn_out + ffn_out` on pre-norm architectures:
- adding v to `l_out-i` equals adding v to a bias summed straight into that residual, where the
  loader takes one: llama's graph passes the optional `blk.i.ffn_down.bias` (TENSOR_NOT_REQUIRED)
  to build_ffn, which adds it after the down projection and before the residual add;
- no block writes along u when its attention-output and FFN-down projections (and their biases)
  are orthogonalised against u; the optional `blk.i.attn_output.bias` (wo_b, added by build_attn)
  can then hold a constant offset along u.
qwen2 and qwen3 have the same residual structure but their loaders take neither an
`attn_output.bias` nor an `ffn_down.bias`: a new bias tensor would be rejected, so only plain
projection bakes there. Gemma 3 normalises each projection's output (attn_post_norm,
ffn_post_norm, RMSNorm with a per-channel weight g) before the residual add: no bias reaches the
residual, and a projection whose rows are orthogonal to g * u writes nothing along u after the norm,
but removing that part of its output shrinks the output's RMS, so the norm scales up everything
else it writes (on Gemma 3 270M the text broke). An approximate
ablation edits the next block's readers instead (`readers`: each reads the residual through an
RMSNorm with weight g, and a reader W (g * h / rms) that sees h without its u component is
W (I - (g u)(u / g)^T) applied to the same normalised input, up to the RMS of the small u part).
Only the attention's value projection: what later tokens can copy from earlier ones is where a
persona's effect travels; editing the other readers too moved every prompt or left more of the
persona (the comparison: docs/baking.md, "On the default model").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    # a bias added straight into the residual stream, created when absent ("" = none the loader takes)
    residual_bias: str
    # the first writer's bias (attention output), which holds a centered projection's offset
    projection_bias: str
    # per-block norm weights applied to attn_output / ffn_down outputs before the residual add
    post_norms: tuple[str, str] | None
    # why an add bake can only be approximate here ("" = it is exact)
    add_limit: str
    sources_read: str  # which llama.cpp file this entry was read from
    # checked against llama.cpp in ggsteer's tests (llama: the tiny model and SmolLM2-135M-Instruct;
    # gemma3: Gemma 3 270M); an untested entry warns (UntestedArchitectureWarning)
    tested: bool
    # the pre-norms and the projections reading through them: where an approximate ablation goes on
    # post-norm architectures (empty: orthogonalise the writers instead)
    readers: tuple[tuple[str, tuple[str, ...]], ...] = ()


WRITERS = ("attn_output", "ffn_down")  # the per-block projections that write into the residual stream

ARCHITECTURES = {
    "llama": Architecture("llama", "ffn_down.bias", "attn_output.bias", None, "", "src/models/llama.cpp", True),
    "qwen2": Architecture("qwen2", "", "", None, "its loader takes no attn_output or ffn_down bias",
                          "src/models/qwen2.cpp", False),
    "qwen3": Architecture("qwen3", "", "", None, "its loader takes no attn_output or ffn_down bias",
                          "src/models/qwen3.cpp", False),
    "gemma3": Architecture("gemma3", "", "", ("post_attention_norm", "post_ffw_norm"),
                           "Gemma 3 normalises each block's writes (post-attention and post-FFN norms), so no "
                           "bias reaches the residual stream", "src/models/gemma3.cpp", True,
                           (("attn_norm", ("attn_v",)),)),
}


class UntestedArchitectureWarning(UserWarning):
    """The bake's edits for this architecture were read from llama.cpp's source but never run."""


def architecture_for(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"cannot bake into architecture {name!r}: ggsteer knows where edits go only for {known}")
    arch = ARCHITECTURES[name]
    if not arch.tested:
        warnings.warn(f"baking into {name} has never been checked against llama.cpp (its edits were read from "
                      f"{arch.sources_read} only): compare the baked file with runtime steering before relying on it",
                      UntestedArchitectureWarning, stacklevel=2)
    return arch
