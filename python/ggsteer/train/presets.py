"""Shipped data: neutral reply openings, held-out evaluation prompts, and the named presets."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

from ggsteer.train.dataset import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    DatasetEntry,
    DatasetError,
    check_template,
    fill,
    make_dataset,
    pair_with_suffixes,
    persona_pairs,
)

DATA_PACKAGE = "ggsteer.data"
SUFFIXES_FILE = "suffixes.json"
EVAL_PROMPTS_FILE = "eval_prompts.json"


class UnknownPresetError(DatasetError, KeyError):
    """No preset has the requested name."""

    # KeyError.__str__ would wrap the message in quotes.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""



# --------------------------------------------------------------------------
# Shipped data


def load_suffixes() -> list[str]:
    """The shipped neutral reply openings (a fresh list on each call)."""
    return list(_shipped_suffixes())


@functools.cache
def _shipped_suffixes() -> tuple[str, ...]:
    suffixes = _read_data_json(SUFFIXES_FILE)
    if not isinstance(suffixes, list) or not suffixes:
        raise DatasetError(f"{SUFFIXES_FILE}: expected a non-empty JSON list")
    for index, suffix in enumerate(suffixes):
        if not isinstance(suffix, str) or not suffix.strip():
            raise DatasetError(f"{SUFFIXES_FILE}: item {index} is not a non-empty string")
    return tuple(suffixes)


def load_eval_prompts(preset_name: str) -> list[dict[str, str]]:
    """Held-out {"prompt", "positive", "negative"} items for one preset."""
    get_preset(preset_name)
    items = _shipped_eval_prompts().get(preset_name)
    if not items:
        raise DatasetError(f"{EVAL_PROMPTS_FILE}: no items for preset {preset_name!r}")
    return [dict(item) for item in items]


@functools.cache
def _shipped_eval_prompts() -> dict[str, tuple[dict[str, str], ...]]:
    data = _read_data_json(EVAL_PROMPTS_FILE)
    if not isinstance(data, dict):
        raise DatasetError(f"{EVAL_PROMPTS_FILE}: expected a JSON object")
    return {name: tuple(_check_eval_items(name, items)) for name, items in data.items()}


def _check_eval_items(name: str, items: object) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise DatasetError(f"{EVAL_PROMPTS_FILE}: {name!r} is not a list")
    for index, item in enumerate(items):
        where = f"{EVAL_PROMPTS_FILE}: {name}[{index}]"
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected an object")
        for key in ("prompt", "positive", "negative"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DatasetError(f"{where}: {key!r} missing or empty")
        if item["positive"] == item["negative"]:
            raise DatasetError(f"{where}: positive and negative are identical")
    return items


def _read_data_json(filename: str) -> object:
    text = resources.files(DATA_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
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
        check_template(self.template)
        persona_pairs(self.positive_personas, self.negative_personas)


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
        # an assistant that declines vs one that complies (anti-jailbreak; evaluate/refusal.py)
        Preset(
            "refusal", "refuses vs complies with requests",
            ("refuses", "declines", "rejects"), ("fulfils", "carries out", "helps with"),
            "You are an assistant who always {persona} what the user asks.",
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
    return pair_with_suffixes(prompts, suffixes)


def _first_suffixes(max_suffixes: int | None) -> list[str]:
    suffixes = load_suffixes()
    if max_suffixes is None:
        return suffixes
    if isinstance(max_suffixes, bool) or not isinstance(max_suffixes, int) or max_suffixes < 1:
        raise DatasetError(f"max_suffixes must be a positive integer, got {max_suffixes!r}")
    return suffixes[:max_suffixes]


def _chat_prompt(chat_template: ChatTemplate, template: str, persona: str) -> str:
    # Fill the persona before wrapping: chat markup may contain literal braces.
    wrapped = chat_template(fill(template, persona))
    if not isinstance(wrapped, str) or not wrapped.strip():
        raise DatasetError(f"chat_template returned {wrapped!r}, expected a non-empty string")
    return wrapped
