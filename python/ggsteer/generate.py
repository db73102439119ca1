"""`ggsteer generate`: one completion, steered, optionally next to the unsteered one."""

from __future__ import annotations

import sys

from ggsteer.cli import CliError, load_model, load_vectors, sampling_kwargs, steering_interventions


def complete(model, prompt: str, sampling: dict) -> str:
    return model.create_completion(prompt, **sampling)["choices"][0]["text"]


def describe_controls(args, vectors) -> str:
    parts = [f"{name} {strength:+g}" for name, _, strength in vectors]
    parts += [f"ablate {path}" for path in args.ablate] + [f"clamp {spec}" for spec in args.clamp]
    return ", ".join(parts) + ("" if args.when == "all" else f", {args.when} tokens only")


def generate_command(args) -> int:
    vectors = load_vectors(args.vector)
    if not (vectors or args.ablate or args.clamp):
        raise CliError("give at least one --vector FILE[:STRENGTH], --ablate FILE or --clamp FILE:VALUE")
    model = load_model(args)
    sampling = sampling_kwargs(args)
    if args.compare:
        baseline = complete(model, args.prompt, sampling)
    model.set_interventions(steering_interventions(model, args, vectors))
    steered = complete(model, args.prompt, sampling)
    if not args.compare:
        print(steered)
        return 0
    print(f"--- prompt ---\n{args.prompt}\n")
    print(f"--- baseline ---\n{baseline.strip()}\n")
    print(f"--- steered ({describe_controls(args, vectors)}) ---\n{steered.strip()}")
    sys.stdout.flush()
    return 0
