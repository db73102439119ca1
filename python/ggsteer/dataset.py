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

import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "DEFAULT_TEMPLATE",
    "PRESETS",
    "DatasetEntry",
    "DatasetError",
    "Preset",
    "UnknownPresetError",
    "dataset_hash",
    "get_preset",
    "list_presets",
    "load_eval_prompts",
    "load_jsonl",
    "load_suffixes",
    "make_dataset",
    "preset_dataset",
    "save_jsonl",
    "truncated_suffixes",
]

DEFAULT_TEMPLATE = "Act as if you are an extremely {persona} person."

_PERSONA_FIELD = "{persona}"
_DATA_PACKAGE = "ggsteer.data"
_SUFFIXES_FILE = "suffixes.json"
_EVAL_PROMPTS_FILE = "eval_prompts.json"
_HASH_VERSION = b"ggsteer-dataset-v1\n"

ChatTemplate = Callable[[str], str]


class DatasetError(ValueError):
    """A dataset, data file or dataset argument is invalid."""


class UnknownPresetError(DatasetError, KeyError):
    """No preset has the requested name."""

    # KeyError.__str__ would wrap the message in quotes.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
    _check_template(template)
    personas = _persona_pairs(positive_personas, negative_personas)
    prompts = [
        (_fill(template, pos), _fill(template, neg)) for pos, neg in personas
    ]
    return _pair_with_suffixes(prompts, suffixes)


def _check_template(template: object) -> None:
    if not isinstance(template, str):
        raise DatasetError(f"template must be a string, got {type(template).__name__}")
    if _PERSONA_FIELD not in template:
        raise DatasetError(f"template must contain {_PERSONA_FIELD}: {_preview(template)}")


def _fill(template: str, persona: str) -> str:
    try:
        return template.format(persona=persona)
    except (KeyError, IndexError, ValueError) as exc:
        # Literal braces must be doubled ("{{"), as with str.format.
        raise DatasetError(
            f"template has a placeholder other than {_PERSONA_FIELD} "
            f"or an unescaped brace: {exc}"
        ) from exc


def _persona_pairs(
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


def _pair_with_suffixes(
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
    entries = []
    # utf-8-sig tolerates a byte-order mark written by some editors.
    with path.open(encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if line.strip():
                entries.append(_parse_line(line, f"{path}:{line_number}"))
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
    path = Path(path)
    text = _to_jsonl(entries)
    if not overwrite and path.exists():
        raise _exists_error(path)
    temp_path = _write_temp(text, path)
    try:
        _publish(temp_path, path, overwrite)
    finally:
        temp_path.unlink(missing_ok=True)


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


def _write_temp(text: str, path: Path) -> Path:
    # Same directory as the target, so os.replace never crosses filesystems.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp_path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_path, _file_mode(path))
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def _file_mode(path: Path) -> int:
    """Keep an overwritten file's mode; otherwise what open() would give."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask
        os.umask(umask)
        return 0o666 & ~umask


def _publish(temp_path: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp_path, path)
        return
    # A hard link fails if the target appeared since the first check,
    # so a concurrent writer's file is never clobbered.
    try:
        os.link(temp_path, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # filesystem without hard links
        if path.exists():
            raise _exists_error(path) from None
        os.replace(temp_path, path)


def _exists_error(path: Path) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST, f"{path} already exists (pass overwrite=True to replace it)", str(path)
    )


def dataset_hash(entries: Iterable[DatasetEntry]) -> str:
    """SHA-256 hex digest of the entries, in order; stable across runs."""
    pairs = [[entry.positive, entry.negative] for entry in entries]
    canonical = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(_HASH_VERSION + canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------
# Shipped data


def load_suffixes() -> list[str]:
    """The shipped neutral reply openings (a fresh list on each call)."""
    return list(_shipped_suffixes())


@functools.cache
def _shipped_suffixes() -> tuple[str, ...]:
    suffixes = _read_data_json(_SUFFIXES_FILE)
    if not isinstance(suffixes, list) or not suffixes:
        raise DatasetError(f"{_SUFFIXES_FILE}: expected a non-empty JSON list")
    for index, suffix in enumerate(suffixes):
        if not isinstance(suffix, str) or not suffix.strip():
            raise DatasetError(f"{_SUFFIXES_FILE}: item {index} is not a non-empty string")
    return tuple(suffixes)


def load_eval_prompts(preset_name: str) -> list[dict[str, str]]:
    """Held-out {"prompt", "positive", "negative"} items for one preset."""
    get_preset(preset_name)
    items = _shipped_eval_prompts().get(preset_name)
    if not items:
        raise DatasetError(f"{_EVAL_PROMPTS_FILE}: no items for preset {preset_name!r}")
    return [dict(item) for item in items]


@functools.cache
def _shipped_eval_prompts() -> dict[str, tuple[dict[str, str], ...]]:
    data = _read_data_json(_EVAL_PROMPTS_FILE)
    if not isinstance(data, dict):
        raise DatasetError(f"{_EVAL_PROMPTS_FILE}: expected a JSON object")
    return {name: tuple(_check_eval_items(name, items)) for name, items in data.items()}


def _check_eval_items(name: str, items: object) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise DatasetError(f"{_EVAL_PROMPTS_FILE}: {name!r} is not a list")
    for index, item in enumerate(items):
        where = f"{_EVAL_PROMPTS_FILE}: {name}[{index}]"
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected an object")
        for key in ("prompt", "positive", "negative"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DatasetError(f"{where}: {key!r} missing or empty")
        if item["positive"] == item["negative"]:
            raise DatasetError(f"{where}: positive and negative are identical")
    return items


def _read_data_json(filename: str) -> object:
    text = resources.files(_DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    """A named behaviour: personas for each side and the instruction template."""

    name: str
    description: str
    positive_personas: tuple[str, ...]
    negative_personas: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        # Tuples keep the shared PRESETS table immutable; lists are accepted.
        object.__setattr__(self, "positive_personas", tuple(self.positive_personas))
        object.__setattr__(self, "negative_personas", tuple(self.negative_personas))
        _check_template(self.template)
        _persona_pairs(self.positive_personas, self.negative_personas)


def _preset(name: str, description: str, positive: str, negative: str) -> Preset:
    return Preset(name, description, tuple(positive.split()), tuple(negative.split()))


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _preset("happy", "happy vs sad", "happy joyful cheerful", "sad depressed gloomy"),
        _preset(
            "honest", "honest vs dishonest",
            "honest truthful sincere", "dishonest deceitful untruthful",
        ),
        _preset("calm", "calm vs angry", "calm serene relaxed", "angry furious irritable"),
        _preset(
            "confident", "confident vs uncertain",
            "confident self-assured decisive", "uncertain insecure hesitant",
        ),
        _preset(
            "creative", "creative vs conventional",
            "creative imaginative inventive", "conventional unimaginative predictable",
        ),
        _preset(
            "formal", "formal vs casual",
            "formal proper businesslike", "casual informal laid-back",
        ),
        _preset(
            "trippy", "trippy (psychedelic) vs sober",
            "trippy psychedelic spaced-out", "sober clear-headed grounded",
        ),
        _preset(
            "lazy", "lazy vs diligent",
            "lazy idle unmotivated", "diligent hardworking industrious",
        ),
        _preset(
            "optimistic", "optimistic vs pessimistic",
            "optimistic hopeful upbeat", "pessimistic hopeless cynical",
        ),
        _preset(
            "verbose", "verbose vs terse",
            "verbose long-winded wordy", "terse concise succinct",
        ),
    )
}


def list_presets() -> list[Preset]:
    """All presets, in definition order."""
    return list(PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called ``name``; UnknownPresetError lists the valid names."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown preset {name!r}; valid presets: {valid}") from None


def preset_dataset(
    name: str,
    *,
    chat_template: ChatTemplate | None = None,
    max_suffixes: int | None = None,
) -> list[DatasetEntry]:
    """Pairs for a preset over the shipped suffixes (the first max_suffixes of them).

    With ``chat_template`` the persona instruction is wrapped in the model's
    chat format and the suffix follows it as the start of the reply.
    """
    preset = get_preset(name)
    suffixes = _first_suffixes(max_suffixes)
    if chat_template is None:
        return make_dataset(
            preset.template, preset.positive_personas, preset.negative_personas, suffixes
        )
    prompts = [
        (_chat_prompt(chat_template, preset.template, pos),
         _chat_prompt(chat_template, preset.template, neg))
        for pos, neg in zip(preset.positive_personas, preset.negative_personas)
    ]
    return _pair_with_suffixes(prompts, suffixes)


def _first_suffixes(max_suffixes: int | None) -> list[str]:
    suffixes = load_suffixes()
    if max_suffixes is None:
        return suffixes
    if isinstance(max_suffixes, bool) or not isinstance(max_suffixes, int) or max_suffixes < 1:
        raise DatasetError(f"max_suffixes must be a positive integer, got {max_suffixes!r}")
    return suffixes[:max_suffixes]


def _chat_prompt(chat_template: ChatTemplate, template: str, persona: str) -> str:
    # Fill the persona before wrapping: chat markup may contain literal braces.
    wrapped = chat_template(_fill(template, persona))
    if not isinstance(wrapped, str) or not wrapped.strip():
        raise DatasetError(f"chat_template returned {wrapped!r}, expected a non-empty string")
    return wrapped
