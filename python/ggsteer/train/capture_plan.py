"""Where a capture's work goes: the token trie over the prompts (or one sequence per prompt), the
rows each prompt pools over, and how the captured rows become each prompt's states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Segment:
    """A run of tokens decoded together into one sequence: an edge of the compressed trie."""

    tokens: list[int]
    start: int  # position of tokens[0] in its sequence
    parent: int  # index of the segment it continues, -1 at the root
    # offset within the segment -> index into the capture store
    wanted: dict[int, int] = field(default_factory=dict)
    children: list[int] = field(default_factory=list)
    seq: int = -1
    unscheduled_children: int = 0
    done: int = 0  # tokens already decoded (a segment may span several decodes)


@dataclass(frozen=True)
class Piece:
    """Tokens [lo, hi) of a segment, decoded in one llama_decode call."""

    segment: Segment
    lo: int
    hi: int


@dataclass
class CapturePlan:
    segments: list[Segment]
    roots: list[int]
    n_captures: int
    # per prompt, the capture indices of the positions it pools over
    prompt_rows: list[list[int]]


# a prompt's pool: "last", "mean", "all", or an int k (the mean of its last k tokens)
Pool = str | int


def pools_per_prompt(pool: Pool | Sequence[Pool], n_prompts: int) -> list[Pool]:
    """One pool for every prompt, or a list with one per prompt."""
    if isinstance(pool, (str, int)):
        return [pool] * n_prompts
    pools = list(pool)
    if len(pools) != n_prompts:
        raise ValueError(f"{n_prompts} prompts but {len(pools)} pools")
    return pools


def plan_shared(token_lists: list[list[int]], pool: Pool | Sequence[Pool], max_segment: int) -> CapturePlan:
    """Compressed token trie over all prompts: each distinct token prefix is decoded once (and
    captured once, however many prompts pool over it)."""
    pools = pools_per_prompt(pool, len(token_lists))
    children: list[dict[int, int]] = [{}]  # node 0 is the empty root
    node_paths = []
    for tokens in token_lists:
        node, path = 0, []
        for token in tokens:
            nxt = children[node].get(token)
            if nxt is None:
                nxt = len(children)
                children[node][token] = nxt
                children.append({})
            node = nxt
            path.append(node)
        node_paths.append(path)
    capture_of_node: dict[int, int] = {}
    prompt_rows = []
    for path, pool in zip(node_paths, pools):
        pooled = path[-pooled_count(pool, len(path)):]
        prompt_rows.append([capture_of_node.setdefault(node, len(capture_of_node)) for node in pooled])

    segments: list[Segment] = []
    roots: list[int] = []
    # (first node of the segment, its token, position, parent segment)
    todo = [(node, token, 0, -1) for token, node in reversed(children[0].items())]
    while todo:
        node, token, start, parent = todo.pop()
        seg = Segment(tokens=[token], start=start, parent=parent)
        _note_wanted(seg, 0, node, capture_of_node)
        while len(children[node]) == 1 and len(seg.tokens) < max_segment:
            (token, node), = children[node].items()
            _note_wanted(seg, len(seg.tokens), node, capture_of_node)
            seg.tokens.append(token)
        index = len(segments)
        segments.append(seg)
        (segments[parent].children if parent >= 0 else roots).append(index)
        end = start + len(seg.tokens)
        todo.extend((child, tok, end, index) for tok, child in reversed(children[node].items()))
    return CapturePlan(segments, roots, len(capture_of_node), prompt_rows)


def _note_wanted(seg: Segment, offset: int, node: int, capture_of_node: dict[int, int]) -> None:
    if node in capture_of_node:
        seg.wanted[offset] = capture_of_node[node]


def plan_unshared(token_lists: list[list[int]], pool: Pool | Sequence[Pool], max_segment: int) -> CapturePlan:
    """Every prompt decoded in full on its own sequence (the baseline the trie must equal)."""
    pools = pools_per_prompt(pool, len(token_lists))
    segments: list[Segment] = []
    roots: list[int] = []
    prompt_rows = []
    n_captures = 0
    for tokens, pool in zip(token_lists, pools):
        offsets = list(range(len(tokens) - pooled_count(pool, len(tokens)), len(tokens)))
        capture_of_offset = {off: n_captures + k for k, off in enumerate(offsets)}
        n_captures += len(offsets)
        prompt_rows.append(list(capture_of_offset.values()))
        parent = -1
        for start in range(0, len(tokens), max_segment):
            chunk = tokens[start : start + max_segment]
            wanted = {o - start: c for o, c in capture_of_offset.items() if start <= o < start + len(chunk)}
            segments.append(Segment(tokens=chunk, start=start, parent=parent, wanted=wanted))
            index = len(segments) - 1
            (segments[parent].children if parent >= 0 else roots).append(index)
            parent = index
    return CapturePlan(segments, roots, n_captures, prompt_rows)


def pooled_count(pool: Pool, n_tokens: int) -> int:
    """How many of a prompt's last tokens its pool reads."""
    if pool == "last":
        return 1
    return min(pool, n_tokens) if isinstance(pool, int) else n_tokens


def pool_rows(store: np.ndarray, plan: CapturePlan, pools: Sequence[Pool]) -> list[np.ndarray]:
    """Each prompt's states: [layers, n_embd] for "last", "mean" and k, [tokens, layers, n_embd] for "all"."""
    pooled = []
    for rows, pool in zip(plan.prompt_rows, pools):
        if pool == "last":
            pooled.append(store[rows[0]])
        elif pool == "mean" or isinstance(pool, int):
            pooled.append(store[rows].mean(axis=0, dtype=np.float64).astype(np.float32))
        else:
            pooled.append(store[rows])
    return pooled
