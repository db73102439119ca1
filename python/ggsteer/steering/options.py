"""The one definition of a steering entry's options: names, types, defaults, bounds and help.

`SteeredModel.set_control` and `make_intervention` (library), the CLI's steering arguments, the
server's `steering` objects and the bake request are made from or checked against `OPTIONS`
(tests/test_options.py checks that they agree), and docs/options.md is `options_markdown()`.
Each option parses a value into its typed, bounded form or raises OptionError naming itself.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ggsteer.vectors import parse_layer_range

OPS = ("add", "ablate", "clamp", "add_normalized")
WHEN = ("all", "prompt", "generated")
BAKE_OPS = ("add", "ablate", "clamp")  # add_normalized depends on each row's norm: no weight edit holds it
CLI_OPS = ("add", "ablate", "clamp")  # --vector, --ablate, --clamp
# the largest strength a user input (CLI, server request) may ask for: 1.0 is the trained gap, and a few
# gaps already degenerate into repetition
MAX_ABS_STRENGTH = 10.0
# the native hook stores positions and counts as int32
INT32_MAX = 2**31 - 1

# where an option can be set
LIBRARY, CLI, SERVER, BAKE = "library", "cli", "server", "bake"


class OptionError(ValueError):
    """A steering option with a value of the wrong type or out of bounds."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class SteeringOption:
    name: str
    kind: str  # "vector", "number", "integer", "choice", "layers", "flag" or "condition"
    default: object  # None: see `default_text`
    help: str
    places: tuple[str, ...]
    default_text: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    cli_flag: str | None = None  # the CLI's spelling where it is a plain argument
    limits: dict[str, str] = field(default_factory=dict)  # place -> what differs there

    @property
    def bounds_text(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else _number_text(self.minimum)
        high = "" if self.maximum is None else _number_text(self.maximum)
        return f"{low}..{high}"

    def parse(self, value, n_layer: int | None = None):
        """`value` in its typed, bounded form (OptionError otherwise); None stays None."""
        if value is None:
            return None
        parser = _PARSERS.get(self.kind)
        return value if parser is None else parser(self, value, n_layer)


def _number_text(number) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _parse_number(option: SteeringOption, value, _n_layer):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(option.name, f"{option.name} must be a finite number, got {short_repr(value)}")
    # abs() first: math.isfinite(int) overflows on an integer of hundreds of digits
    if isinstance(value, numbers.Integral) and abs(value) > 1e300:
        raise OptionError(option.name, f"{option.name} must be a finite number, got {short_repr(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise OptionError(option.name, f"{option.name} must be a finite number, got {short_repr(value)}")
    _check_range(option, number, value)
    return number


def _parse_integer(option: SteeringOption, value, _n_layer):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(option.name, f"{option.name} must be an integer, got {short_repr(value)}")
    _check_range(option, int(value), value)
    return int(value)


def _check_range(option: SteeringOption, number, shown) -> None:
    low, high = option.minimum, option.maximum
    if (low is not None and number < low) or (high is not None and number > high):
        raise OptionError(option.name, f"{option.name} must be within {option.bounds_text}, got {short_repr(shown)}")


def _parse_choice(option: SteeringOption, value, _n_layer):
    if not isinstance(value, str) or value not in option.choices:
        raise OptionError(option.name,
                          f"unknown {option.name} {short_repr(value)}: choose one of {', '.join(option.choices)}")
    return value


def _parse_flag(option: SteeringOption, value, _n_layer):
    if not isinstance(value, bool):
        raise OptionError(option.name, f"{option.name} must be true or false, got {short_repr(value)}")
    return value


def _parse_layers(option: SteeringOption, value, n_layer):
    """"3-14", "1,3,5-7" or a non-empty list of integers, each in 0..n_layer-1 (never expanded past it)."""
    if isinstance(value, str):
        try:
            return parse_layer_range(value, n_layer)
        except ValueError as error:
            raise OptionError(option.name, str(error)) from None
    if isinstance(value, (list, tuple, range)) and len(value) > 0 and \
            all(isinstance(il, numbers.Integral) and not isinstance(il, bool) for il in value):
        limit = n_layer if n_layer is not None else INT32_MAX + 1
        beyond = [il for il in value if not 0 <= il < limit]
        if beyond:
            raise OptionError(option.name,
                              f"layer {short_repr(beyond[0])} is beyond the model: it has layers 0..{limit - 1}")
        return sorted({int(il) for il in value})
    raise OptionError(option.name,
                      f"bad layers {short_repr(value)}: give a range like \"3-14\" or a list of layer numbers")


_PARSERS = {"number": _parse_number, "integer": _parse_integer, "choice": _parse_choice, "flag": _parse_flag,
            "layers": _parse_layers}

ALL = (LIBRARY, CLI, SERVER, BAKE)
OPTIONS_LIST = (
    SteeringOption(
        "vector", "vector", None, "the control vector: a ControlVector (library), a file (CLI, bake) or a loaded "
        "vector's name (server)", ALL),
    SteeringOption(
        "strength", "number", None, "how far to steer, in trained gaps (1.0 = the mean gap between the training "
        "pairs' activations; for clamp, where to hold the projection)", ALL,
        default_text="the vector's recommended strength, else 1.0",
        limits={CLI: f"within +-{MAX_ABS_STRENGTH:g}", SERVER: f"within +-{MAX_ABS_STRENGTH:g}"}),
    SteeringOption(
        "op", "choice", None, "add the vector, ablate (hold the projection at the neutral point), clamp (hold it "
        "at strength gaps past neutral), or add then restore each row's norm", ALL, choices=OPS,
        default_text="the vector's tuned op (`ggsteer tune`), else add",
        limits={CLI: "--vector (add), --ablate, --clamp; no add_normalized", BAKE: f"{', '.join(BAKE_OPS)} only"}),
    SteeringOption(
        "when", "choice", None, "steer every token, only the prompt's, or only generated tokens",
        (LIBRARY, CLI, SERVER), choices=WHEN, cli_flag="--when",
        default_text="the vector's tuned gating (`ggsteer tune`), else all"),
    SteeringOption(
        "layers", "layers", None, "layers to steer, e.g. \"3-14\", \"1,3,5-7\" or [3, 4, 5]", ALL,
        default_text="the vector's recommended layers", cli_flag="--layers",
        limits={SERVER: "each layer in 0..n_layer-1"}),
    SteeringOption(
        "first_k", "integer", None, "steer only positions below k (the first k tokens)", (LIBRARY, CLI, SERVER),
        default_text="no limit", minimum=1, maximum=INT32_MAX, cli_flag="--first-k"),
    SteeringOption(
        "skip_first", "integer", None, "leave positions below k alone (position 0 is the attention sink)",
        (LIBRARY, CLI, SERVER), default_text="1 for ablate and clamp, else 0", minimum=0, maximum=INT32_MAX,
        cli_flag="--skip-first"),
    SteeringOption(
        "condition", "condition", None, "steer only prompts whose mean state at `layer` has at least `threshold` "
        "cosine with the condition vector (CAST); threshold in -1..1, layer before every steered layer",
        (LIBRARY, CLI, SERVER), default_text="always steer",
        cli_flag="--condition",
        limits={LIBRARY: "(vector, threshold, layer) or a Condition", CLI: "FILE:THRESHOLD:LAYER",
                SERVER: '{"vector": name, "threshold": t, "layer": l}'}),
    SteeringOption(
        "raw", "flag", False, "the strength is a plain coefficient (files without a trained gap, e.g. from repeng)",
        (LIBRARY, CLI), cli_flag="--raw", limits={SERVER: "taken from the file's unit"}),
)
OPTIONS = {option.name: option for option in OPTIONS_LIST}
# a condition's own fields: the threshold is a cosine, the layer a block of the model
THRESHOLD = SteeringOption("threshold", "number", None, "cosine the prompt must reach", (), minimum=-1.0, maximum=1.0)
CONDITION_LAYER = SteeringOption("layer", "integer", None, "layer the condition reads", (), minimum=0,
                                 maximum=INT32_MAX)


def options_for(place: str) -> list[SteeringOption]:
    return [option for option in OPTIONS_LIST if place in option.places]


def parse_option(name: str, value, n_layer: int | None = None):
    return OPTIONS[name].parse(value, n_layer)


def parse_strength(value, bounded: bool = True) -> float:
    """A finite strength; at the edges (CLI, server) also within +-MAX_ABS_STRENGTH."""
    too_large = OptionError("strength", f"strength {short_repr(value)} is too large: it must be within "
                                        f"+-{MAX_ABS_STRENGTH:g} (1.0 = the trained gap)")
    # an integer of hundreds of digits is bounded before float() would overflow on it
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if bounded and integer and abs(value) > MAX_ABS_STRENGTH:
        raise too_large
    strength = OPTIONS["strength"].parse(value)
    if strength is None:
        raise OptionError("strength", "strength must be a finite number, got None")
    if bounded and abs(strength) > MAX_ABS_STRENGTH:
        raise too_large
    return strength


def parse_condition_fields(value, n_layer: int | None = None) -> tuple[object, float, int]:
    """(vector, threshold, layer) from a tuple or a {"vector", "threshold", "layer"} object, types checked."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"vector", "threshold", "layer"})
        if unknown or not {"vector", "threshold", "layer"} <= set(value):
            raise OptionError("condition", 'condition must be {"vector": name, "threshold": cosine, "layer": n}')
        value = (value["vector"], value["threshold"], value["layer"])
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise OptionError("condition", f"condition must be (vector, threshold, layer), got {short_repr(value)}")
    vector, threshold, layer = value
    try:
        threshold = THRESHOLD.parse(threshold)
        limit = CONDITION_LAYER if n_layer is None else _layer_below(n_layer)
        layer = limit.parse(layer)
    except OptionError as error:
        raise OptionError("condition", f"condition {error}") from None
    return vector, threshold, layer


def _layer_below(n_layer: int) -> SteeringOption:
    return SteeringOption("layer", "integer", None, "", (), minimum=0, maximum=n_layer - 1)


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def options_markdown() -> str:
    """The table docs/options.md holds (tests/test_options.py checks it is current)."""
    places = (LIBRARY, CLI, SERVER, BAKE)
    lines = ["| option | type | default | bounds | " + " | ".join(places) + " | meaning |",
             "|---" * (5 + len(places)) + "|"]
    for option in OPTIONS_LIST:
        default = option.default_text or ("" if option.default is None else repr(option.default))
        cells = [_place_cell(option, place) for place in places]
        lines.append(f"| `{option.name}` | {option.kind} | {default} | {option.bounds_text} | "
                     + " | ".join(cells) + f" | {option.help} |")
    return "\n".join(lines) + "\n"


def _place_cell(option: SteeringOption, place: str) -> str:
    if place not in option.places:
        return option.limits.get(place, "-")
    spelling = option.cli_flag if place == CLI and option.cli_flag else "yes"
    note = option.limits.get(place)
    return f"{spelling} ({note})" if note else spelling
