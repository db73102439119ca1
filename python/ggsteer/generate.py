"""`ggsteer generate`: one completion, steered, optionally next to the unsteered one."""

from __future__ import annotations

import sys

from ggsteer.cli import CliError, layers_argument, load_model, load_vectors, sampling_kwargs


def complete(model, prompt: str, sampling: dict) -> str:
    return model.create_completion(prompt, **sampling)["choices"][0]["text"]


def describe_controls(vectors) -> str:
    return ", ".join(f"{name} {strength:+g}" for name, _, strength in vectors)


def generate_command(args) -> int:
    vectors = load_vectors(args.vector)
    if not vectors:
        raise CliError("give at least one --vector FILE[:STRENGTH]")
    model = load_model(args)
    sampling = sampling_kwargs(args)
    if args.compare:
        baseline = complete(model, args.prompt, sampling)
    model.set_control([(vector, strength) for _, vector, strength in vectors], layers=layers_argument(args.layers), raw=args.raw)
    steered = complete(model, args.prompt, sampling)
    if not args.compare:
        print(steered)
        return 0
    print(f"--- prompt ---\n{args.prompt}\n")
    print(f"--- baseline ---\n{baseline.strip()}\n")
    print(f"--- steered ({describe_controls(vectors)}) ---\n{steered.strip()}")
    sys.stdout.flush()
    return 0
