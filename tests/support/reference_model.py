"""Test oracle: a tiny random llama model, written as GGUF and re-implemented in numpy.

`write_tiny_llama_gguf` writes a llama-architecture GGUF (all F32, with a small
SentencePiece-style vocabulary) that llama.cpp loads, and returns the same
weights as numpy arrays.  `reference_forward` runs that model in float64 numpy,
independently of llama.cpp, so tests can compare llama.cpp's logits and hidden
states against it and check steering by hooking vectors into chosen layers.

Matrix orientation: every projection is stored with numpy shape (n_out, n_in)
and applied as ``y = x @ W.T`` on row vectors.  GGUF writes numpy shape
(rows, cols) as ggml ne = (cols, rows), which is exactly ggml's matmul
convention ne = (n_in, n_out), so the arrays are written without transposing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Words whose pieces (with every "▁"-prefix of them, so SPM merges can reach them) enter the vocab.
VOCAB_WORDS = (
    "the", "a", "i", "am", "is", "you", "and", "very", "happy", "sad",
    "love", "hate", "good", "bad", "dog", "cat", "feel", "today",
)

BlockOutputHook = Callable[[int, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyHParams:
    n_vocab: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_theta: float
    eps: float
    n_ctx_train: int = 256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class LayerWeights:
    """One transformer block; projections have numpy shape (n_out, n_in)."""

    attn_norm: np.ndarray  # [n_embd]
    wq: np.ndarray  # [n_head * head_dim, n_embd]
    wk: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wv: np.ndarray  # [n_head_kv * head_dim, n_embd]
    wo: np.ndarray  # [n_embd, n_head * head_dim]
    ffn_norm: np.ndarray  # [n_embd]
    w_gate: np.ndarray  # [n_ff, n_embd]
    w_up: np.ndarray  # [n_ff, n_embd]
    w_down: np.ndarray  # [n_embd, n_ff]


@dataclass
class TinyWeights:
    hparams: TinyHParams
    tok_embd: np.ndarray  # [n_vocab, n_embd]
    layers: list[LayerWeights]
    output_norm: np.ndarray  # [n_embd]
    output: np.ndarray  # [n_vocab, n_embd] (lm_head)
    vocab: list[str] = field(default_factory=list)


def _random_matrix(rng: np.random.Generator, n_out: int, n_in: int, gain: float) -> np.ndarray:
    # gain / sqrt(n_in) keeps each projection's output scale ~ gain * input scale.
    return (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)


def _random_norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    # Not all ones, so a forgotten norm weight shows up in the comparison.
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)


def _random_layer(rng: np.random.Generator, hp: TinyHParams) -> LayerWeights:
    n_q = hp.n_head * hp.head_dim
    n_kv = hp.n_head_kv * hp.head_dim
    return LayerWeights(
        attn_norm=_random_norm_weight(rng, hp.n_embd),
        # Large Q/K gains give peaked (non-uniform) attention, so RoPE and masking errors are visible.
        wq=_random_matrix(rng, n_q, hp.n_embd, gain=2.0),
        wk=_random_matrix(rng, n_kv, hp.n_embd, gain=2.0),
        wv=_random_matrix(rng, n_kv, hp.n_embd, gain=1.0),
        wo=_random_matrix(rng, hp.n_embd, n_q, gain=1.0),
        ffn_norm=_random_norm_weight(rng, hp.n_embd),
        w_gate=_random_matrix(rng, hp.n_ff, hp.n_embd, gain=1.0),
        w_up=_random_matrix(rng, hp.n_ff, hp.n_embd, gain=1.0),
        w_down=_random_matrix(rng, hp.n_embd, hp.n_ff, gain=1.0),
    )


def random_tiny_weights(hp: TinyHParams, vocab: list[str], seed: int) -> TinyWeights:
    rng = np.random.default_rng(seed)
    return TinyWeights(
        hparams=hp,
        tok_embd=rng.standard_normal((hp.n_vocab, hp.n_embd)).astype(np.float32),
        layers=[_random_layer(rng, hp) for _ in range(hp.n_layer)],
        output_norm=_random_norm_weight(rng, hp.n_embd),
        output=_random_matrix(rng, hp.n_vocab, hp.n_embd, gain=1.0),
        vocab=list(vocab),
    )


# ---------------------------------------------------------------------------
# Tokenizer (SentencePiece-style "llama" vocab with byte fallback)
# ---------------------------------------------------------------------------

def _word_pieces() -> list[str]:
    """Normal pieces: "▁", letters, "▁"+letter, and every "▁"-prefix of VOCAB_WORDS."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [SPIECE_SPACE] + letters + [SPIECE_SPACE + c for c in letters]
    for word in VOCAB_WORDS:
        marked = SPIECE_SPACE + word
        # SPM tokenizes by merging adjacent symbols into vocab pieces, so each prefix must exist.
        pieces += [marked[:k] for k in range(2, len(marked) + 1)]
    return list(dict.fromkeys(pieces))  # dedupe, keep order


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) for the tiny SPM vocabulary."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces = _word_pieces()
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    # SPM merges the highest-scoring pair first; prefer longer pieces.
    scores = [0.0] * (3 + 256) + [-10.0 + len(p) for p in pieces]
    return tokens, scores, [int(t) for t in types]


# ---------------------------------------------------------------------------
# GGUF writer
# ---------------------------------------------------------------------------

def _add_hparams(writer: gguf.GGUFWriter, hp: TinyHParams) -> None:
    writer.add_name("ggsteer-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)


def _add_tokenizer(writer: gguf.GGUFWriter, tokens, scores, types) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)


def _add_tensors(writer: gguf.GGUFWriter, w: TinyWeights) -> None:
    writer.add_tensor("token_embd.weight", w.tok_embd)
    for il, layer in enumerate(w.layers):
        for suffix, array in (
            ("attn_norm", layer.attn_norm),
            ("attn_q", layer.wq),
            ("attn_k", layer.wk),
            ("attn_v", layer.wv),
            ("attn_output", layer.wo),
            ("ffn_norm", layer.ffn_norm),
            ("ffn_gate", layer.w_gate),
            ("ffn_up", layer.w_up),
            ("ffn_down", layer.w_down),
        ):
            writer.add_tensor(f"blk.{il}.{suffix}.weight", np.ascontiguousarray(array))
    writer.add_tensor("output_norm.weight", w.output_norm)
    writer.add_tensor("output.weight", w.output)


def write_tiny_llama_gguf(
    path,
    *,
    n_layer: int = 3,
    n_embd: int = 48,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 96,
    seed: int = 0,
    rope_theta: float = 10000.0,
    eps: float = 1e-5,
) -> TinyWeights:
    """Write a random tiny llama GGUF to `path` and return its weights."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    tokens, scores, types = build_vocab()
    hp = TinyHParams(
        n_vocab=len(tokens), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_head_kv=n_head_kv, n_ff=n_ff, rope_theta=float(rope_theta), eps=float(eps),
    )
    weights = random_tiny_weights(hp, tokens, seed)

    writer = gguf.GGUFWriter(str(Path(path)), "llama")
    _add_hparams(writer, hp)
    _add_tokenizer(writer, tokens, scores, types)
    _add_tensors(writer, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


# ---------------------------------------------------------------------------
# Numpy forward pass
# ---------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def apply_rope(x: np.ndarray, positions: np.ndarray, theta_base: float) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/d) (llama.cpp's "normal" RoPE).

    x: [n_tokens, n_heads, head_dim].
    """
    head_dim = x.shape[-1]
    inv_freq = theta_base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [n_tokens, head_dim/2]
    cos = np.cos(angles)[:, None, :]
    sin = np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(x.dtype)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def expand_kv_heads(x: np.ndarray, group: int) -> np.ndarray:
    """GQA: query head h reads kv head h // group (group = n_head / n_head_kv consecutive heads)."""
    return np.repeat(x, group, axis=1)


def attention(
    x_normed: np.ndarray, layer: LayerWeights, hp: TinyHParams, *, kv_f16: bool
) -> np.ndarray:
    """Causal GQA self-attention with RoPE; returns the output projection [n_tokens, n_embd]."""
    n_tokens = x_normed.shape[0]
    hd = hp.head_dim
    positions = np.arange(n_tokens)
    q = (x_normed @ layer.wq.T).reshape(n_tokens, hp.n_head, hd)
    k = (x_normed @ layer.wk.T).reshape(n_tokens, hp.n_head_kv, hd)
    v = (x_normed @ layer.wv.T).reshape(n_tokens, hp.n_head_kv, hd)
    q = apply_rope(q, positions, hp.rope_theta)
    k = apply_rope(k, positions, hp.rope_theta)
    if kv_f16:
        # The F16 KV cache stores rotated K and V as half floats; ggml's CPU matmul against an
        # F16 matrix also converts the other operand (Q, then the softmax weights) to F16.
        k, v, q = _to_f16(k), _to_f16(v), _to_f16(q)

    group = hp.n_head // hp.n_head_kv
    k, v = expand_kv_heads(k, group), expand_kv_heads(v, group)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    future = np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)
    scores = np.where(future[None], -np.inf, scores)
    probs = _softmax(scores)
    if kv_f16:
        probs = _to_f16(probs)
    heads = np.einsum("hqk,khd->qhd", probs, v).reshape(n_tokens, hp.n_head * hd)
    return heads @ layer.wo.T


def feed_forward(x_normed: np.ndarray, layer: LayerWeights) -> np.ndarray:
    return (silu(x_normed @ layer.w_gate.T) * (x_normed @ layer.w_up.T)) @ layer.w_down.T


def transformer_block(
    h: np.ndarray, layer: LayerWeights, hp: TinyHParams, *, kv_f16: bool
) -> np.ndarray:
    h = h + attention(rms_norm(h, layer.attn_norm, hp.eps), layer, hp, kv_f16=kv_f16)
    return h + feed_forward(rms_norm(h, layer.ffn_norm, hp.eps), layer)


def reference_forward(
    weights: TinyWeights,
    tokens,
    *,
    kv_f16: bool = True,
    block_output_hook: Optional[BlockOutputHook] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the tiny llama in float64 numpy.

    Returns (hidden [n_layer, n_tokens, n_embd], logits [n_tokens, n_vocab]).
    hidden[il] is the residual stream after block il (llama.cpp's "l_out-il"), taken after
    `block_output_hook(il, h)` has been applied, which is also what feeds block il + 1.
    kv_f16 mimics llama.cpp's default F16 KV cache rounding; use False against an F32 cache.
    """
    hp = weights.hparams
    token_ids = np.asarray(tokens, dtype=np.int64)
    if token_ids.ndim != 1 or token_ids.size == 0:
        raise ValueError("tokens must be a non-empty 1-D sequence")
    h = weights.tok_embd[token_ids].astype(np.float64)
    hidden = []
    for il, layer in enumerate(weights.layers):
        h = transformer_block(h, layer, hp, kv_f16=kv_f16)
        if block_output_hook is not None:
            h = np.asarray(block_output_hook(il, h), dtype=np.float64)
        hidden.append(h)
    logits = rms_norm(h, weights.output_norm, hp.eps) @ weights.output.T
    return np.stack(hidden), logits
