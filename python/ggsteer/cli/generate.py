"""`ggsteer generate`: one completion, steered, optionally next to the unsteered one."""

from __future__ import annotations

import sys

from ggsteer.cli.common import (
    CliError,
    add_model_arguments,
    add_sampling_arguments,
    add_steering_arguments,
    check_sampling_arguments,
    load_model,
    load_vectors,
    sampling_kwargs,
    steering_interventions,
    warn_if_output_is_not_finite,
    warn_if_steering_is_absurd,
)


def add_parser(sub) -> None:
    generate = sub.add_parser("generate", help="complete a prompt with steering")
    add_model_arguments(generate)
    add_steering_arguments(generate)
    generate.add_argument("--prompt", "-p", required=True)
    add_sampling_arguments(generate, 64)
    generate.add_argument("--compare", action="store_true", help="also show the unsteered completion")
    generate.set_defaults(func=generate_command)


def complete(model, prompt: str, sampling: dict) -> str:
    return model.create_completion(prompt, **sampling)["choices"][0]["text"]


def describe_controls(args, vectors) -> str:
    parts = [f"{name} {strength:+g}" for name, _, strength in vectors]
    parts += [f"ablate {path}" for path in args.ablate] + [f"clamp {spec}" for spec in args.clamp]
    return ", ".join(parts) + ("" if args.when in (None, "all") else f", {args.when} tokens only")


def generate_command(args) -> int:
    check_sampling_arguments(args)
    vectors = load_vectors(args.vector)
    if not (vectors or args.ablate or args.clamp):
        raise CliError("give at least one --vector FILE[:STRENGTH], --ablate FILE or --clamp FILE:VALUE")
    warn_if_steering_is_absurd(vectors)
    model = load_model(args)
    sampling = sampling_kwargs(args)
    if args.compare:
        baseline = complete(model, args.prompt, sampling)
    model.set_interventions(steering_interventions(model, args, vectors))
    steered = complete(model, args.prompt, sampling)
    warn_if_output_is_not_finite(model)
    if not args.compare:
        print(steered)
        return 0
    print(f"--- prompt ---\n{args.prompt}\n")
    print(f"--- baseline ---\n{baseline.strip()}\n")
    print(f"--- steered ({describe_controls(args, vectors)}) ---\n{steered.strip()}")
    sys.stdout.flush()
    return 0
