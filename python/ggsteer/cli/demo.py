"""`ggsteer demo`: train a happy/sad vector on the default model and show it steering."""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

from ggsteer import __version__
from ggsteer.cli.common import add_model_arguments, llama_cpp_usage_line, load_model
from ggsteer.generation import generate_batch
from ggsteer.runtime.default_model import cache_dir
from ggsteer.sampling import READABLE_GREEDY
from ggsteer.train import dataset_hash, preset_dataset
from ggsteer.train.extract import DEFAULT_POOL
from ggsteer.vectors import ControlVector

DEMO_PRESET = "happy"
DEMO_METHOD = "mean_diff"
# 3 persona pairs x 60 suffixes: enough for a stable direction, trained in seconds
DEMO_SUFFIXES = 60
DEMO_STRENGTH = 0.6
DEMO_PROMPTS = [
    "I woke up this morning and",
    "My neighbour stopped me in the street to tell me that",
    "Here is what I think about the weekend:",
]
DEFAULT_OUTPUT = "ggsteer-happy.gguf"


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train a happy/sad vector on the default model and show what it does")
    add_model_arguments(demo)
    demo.add_argument("--strength", type=float, default=None, help="steering strength (default: measured default)")
    demo.add_argument("-o", "--output", default=None, help="where to write the vector (default: ./ggsteer-happy.gguf)")
    demo.add_argument("-n", "--max-tokens", type=int, default=40, help="tokens per completion (default: 40)")
    demo.add_argument("--retrain", action="store_true", help="ignore the cached vector")
    demo.set_defaults(func=demo_command)


def cached_vector_path(model, pairs) -> Path:
    stat = Path(model.model_path).stat()
    # the version and the pool are in the key: a newer ggsteer may store more per layer (e.g. the
    # ablation center) or pool the states another way
    key = (f"{Path(model.model_path).stem}-{stat.st_size}-{dataset_hash(pairs)[:12]}-{DEMO_METHOD}-{DEFAULT_POOL}-"
           f"{__version__}")
    return cache_dir() / "vectors" / f"demo-{DEMO_PRESET}-{key}.gguf"


def demo_vector(model, retrain: bool):
    pairs = preset_dataset(DEMO_PRESET, chat_template=model.chat_instruction_formatter(), max_suffixes=DEMO_SUFFIXES)
    cached = cached_vector_path(model, pairs)
    if cached.exists() and not retrain:
        print(f"using the cached vector {cached}", file=sys.stderr)
        return with_preset(ControlVector.load(cached)), cached
    print(f"training a {DEMO_PRESET}/sad vector on {len(pairs)} pairs ({DEMO_METHOD})...", file=sys.stderr)
    start = time.perf_counter()
    vector = with_preset(ControlVector.train(model, pairs, method=DEMO_METHOD, progress=True))
    print(f"trained in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    vector.save(cached, overwrite=True)
    return vector, cached


def with_preset(vector: ControlVector) -> ControlVector:
    """The vector recording its preset, so `ggsteer eval` and `calibrate` know its prompts (its 180 pairs
    are not the preset's full dataset, whose hash would tell)."""
    return ControlVector(dict(vector.directions), vector.model_hint, {**vector.metadata, "eval_preset": DEMO_PRESET})


def write_output(vector, cached: Path, output: str | None) -> Path:
    target = Path(output or DEFAULT_OUTPUT)
    if target.exists():
        if target.read_bytes() != cached.read_bytes():
            print(f"{target} exists and differs: left untouched (give -o PATH to write elsewhere)", file=sys.stderr)
        return target
    vector.save(target)
    return target


def show(label: str, text: str, width: int) -> None:
    body = " ".join(text.split()) or "(nothing)"
    lines = textwrap.wrap(body, width=max(30, width - 16))
    print(f"  {label:<12}| {lines[0]}")
    for line in lines[1:]:
        print(f"  {'':<12}| {line}")


def demo_generations(model, vector, strength: float, prompts, max_tokens: int) -> list[list[tuple[str, str]]]:
    """For each prompt, (label, text) unsteered, pushed toward happy and toward sad: greedy (with the
    readable repeat penalty), every completion decoded in one batch."""
    variants = [("baseline", None), (f"happy +{strength:g}", [(vector, strength)]),
                (f"sad  -{strength:g}", [(vector, -strength)])]
    texts = generate_batch(model, [p for p in prompts for _ in variants], [c for _ in prompts for _, c in variants],
                           max_tokens, **asdict(READABLE_GREEDY))
    n = len(variants)
    return [[(label, texts[i * n + k]) for k, (label, _) in enumerate(variants)] for i in range(len(prompts))]


def demo_command(args) -> int:
    started = time.perf_counter()
    model = load_model(args)
    vector, cached = demo_vector(model, args.retrain)
    strength = DEMO_STRENGTH if args.strength is None else args.strength
    target = write_output(vector, cached, args.output)
    width = shutil.get_terminal_size((100, 20)).columns
    print(f"\nSame prompt, same greedy decoding; only the steering differs (layers {_span(vector)}).\n")
    for prompt, rows in zip(DEMO_PROMPTS, demo_generations(model, vector, strength, DEMO_PROMPTS, args.max_tokens)):
        print(f"{prompt}")
        for label, text in rows:
            show(label, text, width)
        print()
    print(f"vector file: {target}")
    print(llama_cpp_usage_line(model.model_path, target, vector, strength))
    print(f"(demo took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def _span(vector) -> str:
    layers = vector.recommended_layers or vector.layers
    return f"{min(layers)}-{max(layers)}"
