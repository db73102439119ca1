"""Contrastive prompt pairs for training control vectors.

A control vector is the direction separating a model's hidden states on
"positive" prompts from its hidden states on matched "negative" prompts.
This module builds those pairs (repeng style: a persona instruction plus
the opening words of a reply), stores them as JSONL, and ships ready-made
presets with held-out evaluation prompts.

Only the standard library is used here: a model's chat format is applied
through a plain callable, so nothing from llama_cpp is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ggsteer.atomic_file import write_atomically

__all__ = [
    "DEFAULT_TEMPLATE",
    "DatasetEntry",
    "DatasetError",
    "dataset_hash",
    "load_jsonl",
    "make_dataset",
    "save_jsonl",
    "truncated_suffixes",
]

DEFAULT_TEMPLATE = "Act as if you are an extremely {persona} person."

_PERSONA_FIELD = "{persona}"
_HASH_VERSION = b"ggsteer-dataset-v1\n"

ChatTemplate = Callable[[str], str]


class DatasetError(ValueError):
    """A dataset, data file or dataset argument is invalid."""


# --------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class DatasetEntry:
    """One contrastive pair: the same text with opposite behaviours."""

    positive: str
    negative: str

    def __post_init__(self) -> None:
        for side in ("positive", "negative"):
            _check_side(side, getattr(self, side))
        if self.positive == self.negative:
            raise DatasetError(
                f"positive and negative are identical: {_preview(self.positive)}"
            )


def _check_side(side: str, value: object) -> None:
    if not isinstance(value, str):
        raise DatasetError(f"{side!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{side!r} is empty")


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# --------------------------------------------------------------------------
# Building datasets


def make_dataset(
    template: str,
    positive_personas: Sequence[str],
    negative_personas: Sequence[str],
    suffixes: Sequence[str],
) -> list[DatasetEntry]:
    """Build one pair per (suffix, persona pair), suffix-major.

    ``template`` must contain ``{persona}``; the positive and negative text of
    each pair differ only in the persona substituted there.
    """
    check_template(template)
    personas = persona_pairs(positive_personas, negative_personas)
    prompts = [
        (fill(template, pos), fill(template, neg)) for pos, neg in personas
    ]
    return pair_with_suffixes(prompts, suffixes)


def check_template(template: object) -> None:
    if not isinstance(template, str):
        raise DatasetError(f"template must be a string, got {type(template).__name__}")
    if _PERSONA_FIELD not in template:
        raise DatasetError(f"template must contain {_PERSONA_FIELD}: {_preview(template)}")


def fill(template: str, persona: str) -> str:
    try:
        return template.format(persona=persona)
    except (KeyError, IndexError, ValueError) as exc:
        # Literal braces must be doubled ("{{"), as with str.format.
        raise DatasetError(
            f"template has a placeholder other than {_PERSONA_FIELD} "
            f"or an unescaped brace: {exc}"
        ) from exc


def persona_pairs(
    positives: Sequence[str], negatives: Sequence[str]
) -> list[tuple[str, str]]:
    if len(positives) != len(negatives):
        raise DatasetError(
            f"persona lists differ in length: {len(positives)} positive, "
            f"{len(negatives)} negative"
        )
    if not positives:
        raise DatasetError("persona lists are empty")
    for index, (pos, neg) in enumerate(zip(positives, negatives)):
        for side, persona in (("positive", pos), ("negative", neg)):
            if not isinstance(persona, str) or not persona.strip():
                raise DatasetError(f"{side} persona {index} is empty or not a string")
        if pos == neg:
            raise DatasetError(f"persona pair {index} is identical: {pos!r}")
    return list(zip(positives, negatives))


def pair_with_suffixes(
    prompts: Sequence[tuple[str, str]], suffixes: Sequence[str]
) -> list[DatasetEntry]:
    if isinstance(suffixes, str):
        raise DatasetError("suffixes must be a list of strings, not a single string")
    if not suffixes:
        raise DatasetError("suffix list is empty")
    for index, suffix in enumerate(suffixes):
        if not isinstance(suffix, str):
            raise DatasetError(f"suffix {index} must be a string, got {type(suffix).__name__}")
    return [
        DatasetEntry(_join(pos, suffix), _join(neg, suffix))
        for suffix in suffixes
        for pos, neg in prompts
    ]


def _join(prompt: str, suffix: str) -> str:
    """Join with one space, unless either side is empty or already spaced there."""
    if not suffix or not prompt or prompt[-1].isspace() or suffix[0].isspace():
        return prompt + suffix
    return f"{prompt} {suffix}"


def truncated_suffixes(
    replies: Iterable[str], min_words: int = 1, max_words: int | None = None
) -> list[str]:
    """Every word-prefix of each reply ("I", "I am", "I am fine"), deduplicated.

    Words are split on whitespace and re-joined with single spaces.
    """
    if min_words < 1:
        raise DatasetError(f"min_words must be >= 1, got {min_words}")
    if max_words is not None and max_words < min_words:
        raise DatasetError(f"max_words ({max_words}) must be >= min_words ({min_words})")
    if isinstance(replies, str):
        raise DatasetError("replies must be a list of strings, not a single string")
    truncations: dict[str, None] = {}  # a dict keeps first-seen order
    for reply in replies:
        words = reply.split()
        longest = len(words) if max_words is None else min(len(words), max_words)
        for count in range(min_words, longest + 1):
            truncations[" ".join(words[:count])] = None
    return list(truncations)


# --------------------------------------------------------------------------
# JSONL files


def load_jsonl(path: str | os.PathLike[str]) -> list[DatasetEntry]:
    """Read one {"positive": ..., "negative": ...} object per line."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a directory, not a JSONL file of pairs")
    data = path.read_bytes()
    try:
        # utf-8-sig tolerates a byte-order mark written by some editors.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {error.start}): "
                           "save the pairs file as UTF-8") from None
    entries = [
        _parse_line(line, f"{path}:{line_number}")
        for line_number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    if not entries:
        raise DatasetError(f"no pairs in {path}")
    return entries


def _parse_line(line: str, where: str) -> DatasetEntry:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("positive", "negative"):
        if key not in record:
            raise DatasetError(f"{where}: missing key {key!r}")
    try:
        return DatasetEntry(record["positive"], record["negative"])
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def save_jsonl(
    entries: Iterable[DatasetEntry],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> None:
    """Write entries as JSONL atomically; an existing file is kept unless overwrite."""
    text = _to_jsonl(entries)

    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)

    write_atomically(path, write, overwrite=overwrite, what="pairs file")


def _to_jsonl(entries: Iterable[DatasetEntry]) -> str:
    lines = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, DatasetEntry):
            raise DatasetError(f"entry {index} is a {type(entry).__name__}, not a DatasetEntry")
        record = {"positive": entry.positive, "negative": entry.negative}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if not lines:
        raise DatasetError("no pairs to save")  # load_jsonl would reject the file
    return "".join(lines)


def dataset_hash(entries: Iterable[DatasetEntry]) -> str:
    """SHA-256 hex digest of the entries, in order; stable across runs."""
    pairs = [[entry.positive, entry.negative] for entry in entries]
    canonical = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(_HASH_VERSION + canonical.encode("utf-8")).hexdigest()


