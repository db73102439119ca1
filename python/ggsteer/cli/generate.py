"""`ggsteer generate`: one completion, steered, optionally next to the unsteered one.

Models with a chat template get the prompt as a user message in that template (as llama.cpp's tools
do); `--raw-prompt` sends it as written. Both sides of `--compare` are decoded in one batch.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ggsteer.chat_format import ChatPrompt, ChatTemplateError, chat_prompt, has_template
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
    warn_if_steering_is_absurd,
)
from ggsteer.generation import BatchCompletion, generate_batch


def add_parser(sub) -> None:
    generate = sub.add_parser("generate", help="complete a prompt with steering")
    add_model_arguments(generate)
    add_steering_arguments(generate)
    generate.add_argument("--prompt", "-p", required=True,
                          help="the text to complete (a user message, on models with a chat template)")
    generate.add_argument("--raw-prompt", action="store_true",
                          help="plain completion: send the prompt as written, without the model's chat template")
    add_sampling_arguments(generate, 64)
    generate.add_argument("--compare", action="store_true",
                          help="also show the unsteered completion (same settings and seed, decoded in the same batch)")
    generate.set_defaults(func=generate_command)


def prompt_for(model, text: str, raw: bool = False) -> ChatPrompt:
    """The prompt as the engine decodes it: in the model's chat template unless `raw` or the model has none."""
    if raw or not has_template(model):
        return ChatPrompt(text, (), False)
    try:
        return chat_prompt(model, [{"role": "user", "content": text}])
    except ChatTemplateError as error:
        raise CliError(str(error)) from None


def complete(model, prompt: ChatPrompt, controls: list, sampling: dict) -> list[BatchCompletion]:
    """One sequence per entry of `controls` (None: unsteered), all on the same prompt and seed, in one batch."""
    settings = dict(sampling)
    settings["seed"] = [settings.get("seed")] * len(controls)
    results = generate_batch(model, [prompt.text] * len(controls), controls, stop=list(prompt.stops),
                             details=True, **settings)
    # a transcript's reply follows "Assistant:" and starts with a space, as the server drops it too
    return [replace(r, text=r.text.lstrip()) if prompt.strip_leading else r for r in results]


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
    prompt = prompt_for(model, args.prompt, args.raw_prompt)
    controls = steering_interventions(model, args, vectors)
    results = complete(model, prompt, [None, controls] if args.compare else [controls], sampling_kwargs(args))
    if not args.compare:
        print(results[0].text)
        return 0
    baseline, steered = results
    print(f"--- prompt ---\n{args.prompt}\n")
    print(f"--- baseline ---\n{baseline.text.strip()}\n")
    print(f"--- steered ({describe_controls(args, vectors)}) ---\n{steered.text.strip()}")
    sys.stdout.flush()
    return 0
