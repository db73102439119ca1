"""One definition of every steering option (steering/options.py): the library, the CLI, the server and
the bake request agree with it on names, defaults and bounds, and docs/options.md is its table."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ggsteer.bake.plan import BakeError, BakeRequest
from ggsteer.cli.common import OP_FLAGS
from ggsteer.cli.main import build_parser
from ggsteer.model import SteeredModel
from ggsteer.serve.errors import ApiError
from ggsteer.serve.registry import STEERING_KEYS, RegisteredVector, VectorRegistry, intervention_for, parse_setting
from ggsteer.steering.interventions import Intervention, make_intervention, normalize_controls
from ggsteer.steering.options import (
    BAKE,
    BAKE_OPS,
    CLI,
    CLI_OPS,
    INT32_MAX,
    LIBRARY,
    MAX_ABS_STRENGTH,
    OPTIONS,
    OPTIONS_LIST,
    SERVER,
    options_for,
    options_markdown,
)
from ggsteer.vectors import ControlVector, parse_layer_range

N_LAYER, N_EMBD = 6, 8
DOCS = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def vector(layers=(1, 2, 3), unit="gap") -> ControlVector:
    rng = np.random.default_rng(0)
    return ControlVector({il: rng.normal(size=N_EMBD).astype(np.float32) for il in layers}, "llama", {"unit": unit})


def names(place: str) -> set[str]:
    return {option.name for option in options_for(place)}


def keyword_defaults(function) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def steering_actions(command: str = "generate") -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {flag: action for action in sub._actions for flag in action.option_strings}


# -- the four places agree on names and defaults ----------------------------------------------------


def test_every_place_offers_the_options_the_definition_gives_it():
    library = names(LIBRARY) - {"vector", "strength"}
    assert set(keyword_defaults(make_intervention)) == library
    assert set(keyword_defaults(SteeredModel.set_control)) == library
    assert {field.name for field in dataclasses.fields(Intervention)} == names(LIBRARY) - {"raw"}  # raw: read once
    assert set(STEERING_KEYS) == names(SERVER) - {"vector"}
    assert {field.name for field in dataclasses.fields(BakeRequest)} == names(BAKE)
    cli = {option.cli_flag for option in options_for(CLI) if option.cli_flag}
    assert cli <= set(steering_actions())
    # every option that is not a flag of its own is spelled by the op flags (vector, strength, op)
    assert {option.name for option in options_for(CLI) if not option.cli_flag} == {"vector", "strength", "op"}
    assert set(OP_FLAGS) == set(CLI_OPS) and set(OP_FLAGS.values()) <= set(steering_actions())


def test_defaults_agree_with_the_definition():
    for function in (make_intervention, SteeredModel.set_control):
        for name, default in keyword_defaults(function).items():
            assert default == OPTIONS[name].default, (function.__name__, name)
    actions = steering_actions()
    for option in options_for(CLI):
        if option.cli_flag:
            assert actions[option.cli_flag].default == option.default, option.name
            assert actions[option.cli_flag].help.startswith(option.help), option.name
            if option.choices:
                assert tuple(actions[option.cli_flag].choices) == option.choices
    # the server: an object giving no settings is the definition's defaults
    parsed = parse_setting({}, N_LAYER)
    assert {key: parsed[key] for key in ("op", "when", "first_k", "skip_first", "layers", "condition")} == \
        {key: OPTIONS[key].default for key in ("op", "when", "first_k", "skip_first", "layers", "condition")}
    item = make_intervention(vector(), 1.0, N_LAYER, N_EMBD)
    assert (item.op, item.when, item.first_k, item.condition) == ("add", "all", None, None)


def test_the_docstrings_name_every_library_option():
    for function in (SteeredModel.set_control, normalize_controls):
        missing = [name for name in names(LIBRARY) - {"vector", "strength"} if name not in function.__doc__]
        assert not missing, (function.__name__, missing)


def test_bake_requests_take_the_ops_and_strengths_the_definition_allows():
    assert set(BAKE_OPS) < set(OPTIONS["op"].choices)
    BakeRequest("clamp", vector(), 0.5, (1,))
    with pytest.raises(BakeError, match="cannot bake op 'add_normalized'"):
        BakeRequest("add_normalized", vector(), 0.5, (1,))
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(BakeError, match="strength must be a finite number"):
            BakeRequest("add", vector(), bad, (1,))


# -- the bounds hold in every place ---------------------------------------------------------------


def library(**options):
    return make_intervention(vector(), options.pop("strength", 1.0), N_LAYER, N_EMBD, **options)


def server(**options):
    model = SimpleNamespace(n_layer=N_LAYER, n_embd=N_EMBD)
    entry = RegisteredVector("v", Path("v.gguf"), vector())
    registry = VectorRegistry([entry])
    return intervention_for(entry, options, model, registry)


def cli(**options):
    argv = ["generate", "-p", "x", "-v", "v.gguf"]
    for name, value in options.items():
        argv += [OPTIONS[name].cli_flag, str(value)]
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(("name", "good", "bad"), [
    ("first_k", [1, INT32_MAX], [0, INT32_MAX + 1, 10**30]),
    ("skip_first", [0, INT32_MAX], [-1, INT32_MAX + 1, 10**30]),
])
def test_integer_bounds_agree_in_the_library_the_cli_and_the_server(name, good, bad, capsys):
    for value in good:
        assert getattr(library(**{name: value}), name) == value
        assert getattr(server(**{name: value}), name) == value
        assert getattr(cli(**{name: value}), name) == value
    for value in bad:
        with pytest.raises(ValueError, match=f"{name} must be within"):
            library(**{name: value})
        with pytest.raises(ApiError, match=f"steering.v: {name} must be within"):
            server(**{name: value})
        with pytest.raises(SystemExit):
            cli(**{name: value})
        assert f"{name} must be within" in capsys.readouterr().err


@pytest.mark.parametrize("value", [True, 2.0, 1e300, float("inf"), "3"])
def test_integers_refuse_booleans_floats_and_strings(value):
    for name in ("first_k", "skip_first"):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            library(**{name: value})
        with pytest.raises(ApiError, match=f"{name} must be an integer"):
            server(**{name: value})


def test_strength_is_finite_everywhere_and_bounded_at_the_edges(capsys):
    edge = MAX_ABS_STRENGTH + 0.5
    assert library(strength=edge).strength == edge  # the library trusts its caller with any finite strength
    assert server(strength=MAX_ABS_STRENGTH).strength == MAX_ABS_STRENGTH
    with pytest.raises(ApiError, match=r"within \+-10"):
        server(strength=edge)
    with pytest.raises(ApiError, match=r"within \+-10"):
        server(strength=10**400)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            library(strength=bad)
        with pytest.raises(ApiError, match="finite number"):
            server(strength=bad)
    from ggsteer.cli.common import CliError, parse_vector_spec

    assert parse_vector_spec("v.gguf:10")[1] == 10.0
    with pytest.raises(CliError, match=r"within \+-10"):
        parse_vector_spec(f"v.gguf:{edge}")


def test_layers_are_bounded_by_the_model_everywhere():
    assert library(layers="1-3").layers == (1, 2, 3)
    assert server(layers="1-3").layers == (1, 2, 3)
    for layers in ("1-6", "6", [6], "1-20000000", [1, 10**30]):
        with pytest.raises(ValueError, match="beyond the model: it has layers 0..5"):
            library(layers=layers)
        with pytest.raises(ApiError, match="beyond the model: it has layers 0..5"):
            server(layers=layers)
    for layers in ([True], [], "", [1.0]):
        with pytest.raises(ApiError, match="layer"):
            server(layers=layers)


def test_a_huge_layer_range_is_refused_without_being_expanded():
    """issue 24 item 3: "1-20000000" took 4 s and 48 MB before its 400; the bound comes first now."""
    tracemalloc.start()
    try:
        for text in ("1-2000000", "0-" + "9" * 4000, ",".join(["0-17"] * 20000)):
            with pytest.raises(ValueError, match="beyond the model"):
                parse_layer_range(text, 18) if not text.startswith("0-17") else parse_layer_range(text + ",18", 18)
        assert parse_layer_range(",".join(["0-17"] * 20000), 18) == list(range(18))  # each layer once
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # the repeated-range spec itself is 100 kB; 2M layers would be ~70 MB
    with pytest.raises(ValueError, match="layer 99999999... .4000 digits. is beyond"):
        parse_layer_range("0-" + "9" * 4000)


def test_conditions_name_a_loaded_vector_on_the_server():
    item = server(condition={"vector": "v", "threshold": 0.25, "layer": 1}, layers="2-3")
    assert (item.condition.threshold, item.condition.layer) == (0.25, 1)
    for condition, message in [({"vector": "v", "threshold": 2, "layer": 1}, r"threshold must be within -1..1"),
                               ({"vector": "v", "threshold": 0.1, "layer": True}, "layer must be an integer"),
                               ({"vector": "v", "threshold": 0.1, "layer": 10**30}, "layer must be within 0..5"),
                               ({"vector": "v", "threshold": 0.1}, "condition must be"),
                               ({"vector": "nope", "threshold": 0.1, "layer": 1}, "unknown vector 'nope'")]:
        with pytest.raises(ApiError, match=message):
            server(condition=condition, layers="2-3")


def test_cli_parses_every_option_before_any_model_loads(capsys):
    args = cli(when="prompt", layers="1-3", first_k=4, skip_first=2, condition="c.gguf:0.5:1")
    assert (args.when, args.layers, args.first_k, args.skip_first) == ("prompt", "1-3", 4, 2)
    assert args.condition == (Path("c.gguf"), 0.5, 1)
    for name, value, message in [("condition", "c.gguf:2:1", "threshold must be within -1..1"),
                                 ("condition", "c.gguf:0.5", "expected FILE:THRESHOLD:LAYER"),
                                 ("layers", "1-20000000", "beyond the model"), ("first_k", "true", "an integer")]:
        with pytest.raises(SystemExit):
            cli(**{name: value})
        assert message in capsys.readouterr().err


# -- the documentation ------------------------------------------------------------------------------


def test_docs_hold_the_table_of_every_option():
    text = DOCS.read_text()
    assert options_markdown() in text, "docs/options.md is stale: paste options_markdown()'s output into it"
    for option in OPTIONS_LIST:
        assert f"| `{option.name}` |" in text
