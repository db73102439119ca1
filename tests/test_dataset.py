"""Tests for ggsteer.dataset: pair building, JSONL files, hashing, presets, data."""

from __future__ import annotations

import ast
import json
import os
import string
import sys
from importlib import resources
from pathlib import Path

import pytest

from ggsteer import atomic_file
from ggsteer.train import dataset as dataset_module
from ggsteer.train.dataset import (
    DEFAULT_TEMPLATE,
    DatasetEntry,
    DatasetError,
    dataset_hash,
    load_jsonl,
    make_dataset,
    save_jsonl,
    truncated_suffixes,
)
from ggsteer.train.presets import (
    PRESETS,
    Preset,
    get_preset,
    list_presets,
    load_eval_prompts,
    load_suffixes,
    preset_dataset,
)

PRESET_NAMES = {
    "happy", "honest", "calm", "confident", "creative",
    "formal", "trippy", "lazy", "optimistic", "verbose", "refusal",
}
# presets whose first positive persona is not their name (an assistant's behaviour, not an adjective)
FIRST_PERSONA = {"refusal": "refuses"}
TEMPLATE = "Act as if you are an extremely {persona} person."


def persona_difference(positive: str, negative: str) -> tuple[str, str]:
    """What remains of each string once their common prefix and suffix are cut."""
    start = 0
    while start < min(len(positive), len(negative)) and positive[start] == negative[start]:
        start += 1
    end = 0
    limit = min(len(positive), len(negative)) - start
    while end < limit and positive[-1 - end] == negative[-1 - end]:
        end += 1
    return positive[start : len(positive) - end], negative[start : len(negative) - end]


def words(text: str) -> list[str]:
    return [word.strip(string.punctuation).lower() for word in text.split()]


def starts_with_words(text: str, prefix: str) -> bool:
    prefix_words = words(prefix)
    return words(text)[: len(prefix_words)] == prefix_words


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def pair_line(positive: str, negative: str) -> str:
    return json.dumps({"positive": positive, "negative": negative})


# --------------------------------------------------------------------------
# DatasetEntry


def test_entry_holds_both_sides():
    entry = DatasetEntry("I am happy", "I am sad")
    assert (entry.positive, entry.negative) == ("I am happy", "I am sad")


def test_entry_is_frozen():
    entry = DatasetEntry("a", "b")
    with pytest.raises(AttributeError):
        entry.positive = "c"


@pytest.mark.parametrize(
    ("positive", "negative", "message"),
    [
        ("", "b", "'positive' is empty"),
        ("a", "   \n", "'negative' is empty"),
        (3, "b", "'positive' must be a string, got int"),
        ("a", None, "'negative' must be a string, got NoneType"),
        ("same text", "same text", "identical: 'same text'"),
    ],
)
def test_entry_rejects_bad_sides(positive, negative, message):
    with pytest.raises(DatasetError) as caught:
        DatasetEntry(positive, negative)
    assert message in str(caught.value)


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------
# make_dataset


def test_make_dataset_count_and_order():
    suffixes = ["I think", "Well,", "The sky"]
    entries = make_dataset(TEMPLATE, ["happy", "joyful"], ["sad", "gloomy"], suffixes)
    assert len(entries) == 3 * 2
    # Suffix-major: every persona pair for the first suffix, then the next suffix.
    assert entries[0] == DatasetEntry(
        "Act as if you are an extremely happy person. I think",
        "Act as if you are an extremely sad person. I think",
    )
    assert entries[1] == DatasetEntry(
        "Act as if you are an extremely joyful person. I think",
        "Act as if you are an extremely gloomy person. I think",
    )
    assert entries[2].positive.endswith("happy person. Well,")
    assert entries[5].negative == "Act as if you are an extremely gloomy person. The sky"


def test_make_dataset_pairs_differ_only_in_persona():
    positives, negatives = ["happy", "joyful", "cheerful"], ["sad", "depressed", "gloomy"]
    suffixes = ["I think", "Here is what", "When I was young", ""]
    entries = make_dataset(TEMPLATE, positives, negatives, suffixes)
    for index, entry in enumerate(entries):
        pos, neg = positives[index % 3], negatives[index % 3]
        assert persona_difference(entry.positive, entry.negative) == persona_difference(pos, neg)
        assert entry.positive.replace(pos, neg, 1) == entry.negative


def test_make_dataset_spacing():
    entries = make_dataset("Be {persona}.", ["happy"], ["sad"], ["", "I think", " leading"])
    assert [entry.positive for entry in entries] == [
        "Be happy.", "Be happy. I think", "Be happy. leading",
    ]


def test_make_dataset_no_space_after_prompt_ending_in_whitespace():
    entries = make_dataset("<user>Be {persona}.</user>\n<bot>\n", ["happy"], ["sad"], ["I think"])
    assert entries[0].positive == "<user>Be happy.</user>\n<bot>\nI think"


def test_make_dataset_accepts_escaped_braces():
    entries = make_dataset("{{json}} be {persona}", ["happy"], ["sad"], ["ok"])
    assert entries[0].positive == "{json} be happy ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Be happy.", ["happy"], ["sad"], ["x"]), "must contain {persona}"),
        ((TEMPLATE, ["happy", "joyful"], ["sad"], ["x"]), "differ in length: 2 positive, 1"),
        ((TEMPLATE, [], [], ["x"]), "persona lists are empty"),
        ((TEMPLATE, ["happy"], ["sad"], []), "suffix list is empty"),
        ((TEMPLATE, ["happy"], ["sad"], "I think"), "not a single string"),
        ((TEMPLATE, ["happy"], ["sad"], ["ok", 7]), "suffix 1 must be a string"),
        ((TEMPLATE, ["happy", "calm"], ["sad", "calm"], ["x"]), "pair 1 is identical: 'calm'"),
        ((TEMPLATE, ["happy", " "], ["sad", "angry"], ["x"]), "positive persona 1 is empty"),
        (("Be {persona} {mood}", ["happy"], ["sad"], ["x"]), "placeholder other than {persona}"),
    ],
)
def test_make_dataset_rejects_bad_input(args, message):
    with pytest.raises(DatasetError) as caught:
        make_dataset(*args)
    assert message in str(caught.value)


# --------------------------------------------------------------------------
# truncated_suffixes


def test_truncated_suffixes_all_prefixes_in_order():
    assert truncated_suffixes(["I am fine", "I am here"]) == [
        "I", "I am", "I am fine", "I am here",
    ]


def test_truncated_suffixes_word_limits():
    replies = ["one two three four", "five six"]
    assert truncated_suffixes(replies, min_words=2, max_words=3) == [
        "one two", "one two three", "five six",
    ]


def test_truncated_suffixes_normalizes_whitespace_and_skips_empty():
    assert truncated_suffixes(["  Hello   there\nfriend ", "", "   "]) == [
        "Hello", "Hello there", "Hello there friend",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_words": 0}, "min_words must be >= 1"),
        ({"min_words": 3, "max_words": 2}, "max_words (2) must be >= min_words (3)"),
    ],
)
def test_truncated_suffixes_rejects_bad_limits(kwargs, message):
    with pytest.raises(DatasetError) as caught:
        truncated_suffixes(["a b c"], **kwargs)
    assert message in str(caught.value)


# --------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip(tmp_path):
    entries = [
        DatasetEntry("I am happy", "I am sad"),
        DatasetEntry("Ünïcode ✓ \"quoted\"", "line\nbreak\ttab"),
        DatasetEntry("  padded  ", "x"),
    ]
    path = tmp_path / "pairs.jsonl"
    save_jsonl(entries, path)
    assert load_jsonl(path) == entries
    assert path.read_text(encoding="utf-8").count("\n") == len(entries)


def test_load_jsonl_ignores_blank_lines(tmp_path):
    lines = ["", pair_line("a", "b"), "   ", pair_line("c", "d"), ""]
    path = write_lines(tmp_path / "p.jsonl", *lines)
    assert load_jsonl(path) == [DatasetEntry("a", "b"), DatasetEntry("c", "d")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"positive": "a", "negative": ', ":2: invalid JSON"),
        ('{"positive": "a"}', ":2: missing key 'negative'"),
        ('{"negative": "a"}', ":2: missing key 'positive'"),
        ('{"positive": "  ", "negative": "b"}', ":2: 'positive' is empty"),
        ('{"positive": "a", "negative": ""}', ":2: 'negative' is empty"),
        ('{"positive": "same", "negative": "same"}', ":2: positive and negative are identical"),
        ('{"positive": 1, "negative": "b"}', ":2: 'positive' must be a string"),
        ('["a", "b"]', ":2: expected a JSON object, got list"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    lines = [pair_line("ok", "fine"), bad_line, pair_line("c", "d")]
    path = write_lines(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(DatasetError) as caught:
        load_jsonl(path)
    assert f"{path}{message}" in str(caught.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_load_jsonl_without_pairs(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_jsonl(path)
    assert str(caught.value) == f"no pairs in {path}"


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"original bytes\n")
    with pytest.raises(FileExistsError) as caught:
        save_jsonl([DatasetEntry("a", "b")], path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == b"original bytes\n"
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]


def test_save_overwrites_when_asked(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"original bytes\n")
    save_jsonl([DatasetEntry("a", "b")], path, overwrite=True)
    assert load_jsonl(path) == [DatasetEntry("a", "b")]


def test_save_leaves_no_temp_files(tmp_path):
    save_jsonl([DatasetEntry("a", "b")], tmp_path / "one.jsonl")
    save_jsonl([DatasetEntry("c", "d")], tmp_path / "one.jsonl", overwrite=True)
    save_jsonl([DatasetEntry("e", "f")], tmp_path / "two.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "two.jsonl"]


def test_save_cleans_up_when_replace_fails(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic_file.os, "replace", failing_replace)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"old\n")
    with pytest.raises(OSError, match="disk on fire"):
        save_jsonl([DatasetEntry("a", "b")], path, overwrite=True)
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_save_without_hard_links_falls_back_to_replace(tmp_path, monkeypatch):
    def no_link(source, target):
        raise OSError("hard links not supported")

    monkeypatch.setattr(atomic_file.os, "link", no_link)
    path = tmp_path / "pairs.jsonl"
    save_jsonl([DatasetEntry("a", "b")], path)
    assert load_jsonl(path) == [DatasetEntry("a", "b")]
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_save_does_not_clobber_a_file_created_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    real_create_temp_file = atomic_file.create_temp_file

    def create_temp_then_race(target):
        temp_path = real_create_temp_file(target)
        target.write_bytes(b"other writer\n")  # appears after the existence check
        return temp_path

    monkeypatch.setattr(atomic_file, "create_temp_file", create_temp_then_race)
    with pytest.raises(FileExistsError):
        save_jsonl([DatasetEntry("a", "b")], path)
    assert path.read_bytes() == b"other writer\n"
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [([], "no pairs to save"), ([("a", "b")], "entry 0 is a tuple, not a DatasetEntry")],
)
def test_save_rejects_bad_entries_without_writing(tmp_path, entries, message):
    path = tmp_path / "pairs.jsonl"
    with pytest.raises(DatasetError) as caught:
        save_jsonl(entries, path)
    assert message in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_saved_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_jsonl([DatasetEntry("a", "b")], tmp_path / "pairs.jsonl")
    finally:
        os.umask(umask)
    assert (tmp_path / "pairs.jsonl").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------
# dataset_hash


def test_dataset_hash_is_pinned():
    # A golden value: changing the canonical form must be a deliberate decision.
    entries = [DatasetEntry("I am happy", "I am sad"), DatasetEntry("ü", "✓")]
    expected = "9baeba928e3b1b1b6433134114d4405b959c6f5a99fb6d1c658679bd01152675"
    assert dataset_hash(entries) == expected


def test_dataset_hash_equal_for_equal_lists():
    first = make_dataset(TEMPLATE, ["happy"], ["sad"], ["I think", "Well,"])
    second = make_dataset(TEMPLATE, ["happy"], ["sad"], ["I think", "Well,"])
    assert dataset_hash(first) == dataset_hash(second)
    assert len(dataset_hash(first)) == 64
    assert int(dataset_hash(first), 16) >= 0


def test_dataset_hash_is_order_and_side_sensitive():
    a, b = DatasetEntry("a", "b"), DatasetEntry("c", "d")
    hashes = {
        dataset_hash([a, b]),
        dataset_hash([b, a]),
        dataset_hash([DatasetEntry("b", "a"), b]),
        dataset_hash([a]),
        dataset_hash([DatasetEntry("ab", "c")]),
        dataset_hash([DatasetEntry("a", "bc")]),
    }
    assert len(hashes) == 6


# --------------------------------------------------------------------------
# Presets


def test_preset_names():
    assert set(PRESETS) == PRESET_NAMES
    assert [preset.name for preset in list_presets()] == list(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_preset_personas(name):
    preset = get_preset(name)
    assert isinstance(preset, Preset)
    assert preset.name == name
    assert preset.positive_personas[0] == FIRST_PERSONA.get(name, name)
    assert 2 <= len(preset.positive_personas) == len(preset.negative_personas) <= 4
    assert not set(preset.positive_personas) & set(preset.negative_personas)
    assert "{persona}" in preset.template
    assert preset.description


def test_preset_opposites():
    opposites = {name: get_preset(name).negative_personas[0] for name in PRESET_NAMES}
    assert opposites == {
        "happy": "sad", "honest": "dishonest", "calm": "angry",
        "confident": "uncertain", "creative": "conventional", "formal": "casual",
        "trippy": "sober", "lazy": "diligent", "optimistic": "pessimistic",
        "verbose": "terse", "refusal": "fulfils",
    }


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_preset_dataset_with_300_suffixes(name):
    preset = get_preset(name)
    entries = preset_dataset(name, max_suffixes=300)
    personas = len(preset.positive_personas)
    assert len(entries) == 300 * personas >= 100
    assert len(set(entries)) == len(entries)
    first_suffix = load_suffixes()[0]
    assert entries[0].positive == f"{preset.template.format(persona=FIRST_PERSONA.get(name, name))} {first_suffix}"
    for index, entry in enumerate(entries):
        pos = preset.positive_personas[index % personas]
        neg = preset.negative_personas[index % personas]
        assert entry.positive.replace(pos, neg, 1) == entry.negative


def test_preset_dataset_defaults_to_all_suffixes():
    assert len(preset_dataset("happy")) == len(load_suffixes()) * 3


def test_preset_dataset_with_chat_template():
    def chat(text: str) -> str:
        return f"<|user|>{{{text}}}<|end|>\n<|assistant|>\n"

    entries = preset_dataset("calm", chat_template=chat, max_suffixes=2)
    first, second = load_suffixes()[:2]
    assert len(entries) == 2 * 3
    assert entries[0] == DatasetEntry(
        "<|user|>{Act as if you are an extremely calm person.}<|end|>\n<|assistant|>\n" + first,
        "<|user|>{Act as if you are an extremely angry person.}<|end|>\n<|assistant|>\n" + first,
    )
    assert entries[3].positive.endswith("\n" + second)


def test_preset_dataset_chat_template_without_trailing_newline_gets_a_space():
    def chat(text: str) -> str:
        return f"[INST] {text} [/INST]"

    entries = preset_dataset("happy", chat_template=chat, max_suffixes=1)
    suffix = load_suffixes()[0]
    instruction = "Act as if you are an extremely happy person."
    assert entries[0].positive == f"[INST] {instruction} [/INST] {suffix}"


def test_preset_dataset_rejects_bad_chat_template_output():
    with pytest.raises(DatasetError) as caught:
        preset_dataset("happy", chat_template=lambda text: None, max_suffixes=1)  # noqa: ARG005 - a template
    assert "chat_template returned None" in str(caught.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_preset_dataset_rejects_bad_max_suffixes(bad):
    with pytest.raises(DatasetError) as caught:
        preset_dataset("happy", max_suffixes=bad)
    assert "max_suffixes must be a positive integer" in str(caught.value)


@pytest.mark.parametrize("lookup", [get_preset, preset_dataset, load_eval_prompts])
def test_unknown_preset_lists_valid_names(lookup):
    with pytest.raises(DatasetError) as caught:
        lookup("grumpy")
    message = str(caught.value)
    assert "unknown preset 'grumpy'" in message
    assert message.endswith("valid presets: " + ", ".join(sorted(PRESET_NAMES)))
    assert isinstance(caught.value, KeyError)


def test_default_template_reads_as_plain_text():
    expected = "Act as if you are an extremely happy person."
    assert DEFAULT_TEMPLATE.format(persona="happy") == expected


# --------------------------------------------------------------------------
# Shipped data


def test_data_files_are_package_resources():
    data = resources.files("ggsteer.data")
    assert data.joinpath("__init__.py").is_file()
    assert data.joinpath("suffixes.json").is_file()
    assert data.joinpath("eval_prompts.json").is_file()


def test_suffixes_are_many_unique_and_short():
    suffixes = load_suffixes()
    assert len(suffixes) >= 300
    assert len(set(suffixes)) == len(suffixes)
    assert all(suffix == suffix.strip() and 1 <= len(suffix.split()) <= 8 for suffix in suffixes)
    lengths = {len(suffix.split()) for suffix in suffixes}
    assert {1, 2, 3, 4, 5, 6, 7} <= lengths


def test_suffixes_avoid_persona_words():
    persona_words = {
        word
        for preset in list_presets()
        for word in (*preset.positive_personas, *preset.negative_personas)
    }
    hits = [s for s in load_suffixes() if set(words(s)) & persona_words]
    assert hits == []


def test_load_suffixes_returns_a_fresh_list():
    suffixes = load_suffixes()
    suffixes.clear()
    assert len(load_suffixes()) >= 300


@pytest.mark.parametrize("name", sorted(PRESET_NAMES))
def test_eval_prompts(name):
    items = load_eval_prompts(name)
    assert len(items) >= 12
    for item in items:
        assert set(item) == {"prompt", "positive", "negative"}
        assert item["prompt"] == item["prompt"].strip()
        assert item["positive"] != item["negative"]
        for side in ("positive", "negative"):
            continuation = item[side]
            assert continuation.startswith(" ") and not continuation.startswith("  ")
            assert 1 <= len(continuation.split()) <= 4


def test_eval_prompts_are_held_out_from_suffixes():
    suffixes = load_suffixes()
    prompts = [item["prompt"] for name in PRESET_NAMES for item in load_eval_prompts(name)]
    assert len(set(prompts)) == len(prompts)
    overlaps = [
        (prompt, suffix)
        for prompt in prompts
        for suffix in suffixes
        if prompt.startswith(suffix) or starts_with_words(prompt, suffix)
    ]
    assert overlaps == []


def test_eval_prompts_cover_every_preset_and_nothing_else():
    path = resources.files("ggsteer.data").joinpath("eval_prompts.json")
    raw = json.loads(path.read_text("utf-8"))
    assert set(raw) == PRESET_NAMES


def test_load_eval_prompts_returns_copies():
    items = load_eval_prompts("happy")
    items[0]["prompt"] = "changed"
    assert load_eval_prompts("happy")[0]["prompt"] != "changed"


# --------------------------------------------------------------------------
# Dependencies


def test_module_imports_only_stdlib_numpy_and_the_atomic_writer():
    tree = ast.parse(Path(dataset_module.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module if node.module.startswith("ggsteer") else node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "ggsteer.atomic_file"}
    assert imported - allowed == set()
