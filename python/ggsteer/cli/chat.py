"""`ggsteer chat`: a terminal conversation whose steering changes live between turns.

Commands: /strength NAME VALUE, /vectors, /reset (steering off), /clear (new conversation),
/help, /quit. Models with a chat template use it; base models get a plain transcript. Replies come
from the same batch engine, sampler and chat formatting as `ggsteer generate` and the server.
"""

from __future__ import annotations

import sys

from ggsteer.chat_format import ChatTemplateError, chat_prompt
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
)
from ggsteer.cli.generate import complete

HELP = "commands: /strength NAME VALUE, /vectors, /reset, /clear, /help, /quit"


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal with live steering (/strength, /vectors, /reset)")
    add_model_arguments(chat)
    add_steering_arguments(chat)
    add_sampling_arguments(chat, 128)
    chat.set_defaults(func=chat_command)


class ChatSession:
    def __init__(self, model, vectors, args, sampling: dict):
        self.model = model
        self.strengths = {name: strength for name, _, strength in vectors}
        self.vectors = {name: vector for name, vector, _ in vectors}
        self.args = args
        self.sampling = sampling
        self.history: list[dict[str, str]] = []
        self.controls: list = []
        self.apply_steering()

    def apply_steering(self) -> None:
        active = [(name, self.vectors[name], s) for name, s in self.strengths.items() if s != 0.0]
        self.controls = steering_interventions(self.model, self.args, active)

    def command(self, line: str) -> str:
        """Run a /command; returns what to print."""
        parts = line.split()
        name = parts[0]
        if name == "/strength":
            return self.set_strength(parts[1:])
        if name == "/vectors":
            return self.describe()
        if name == "/reset":
            self.strengths = {key: 0.0 for key in self.strengths}
            self.apply_steering()
            return "steering off (all strengths 0)"
        if name == "/clear":
            self.history.clear()
            return "new conversation"
        if name == "/help":
            return HELP
        return f"unknown command {name}; {HELP}"

    def set_strength(self, args: list[str]) -> str:
        if len(args) != 2:
            return "usage: /strength NAME VALUE"
        name, text = args
        if name not in self.vectors:
            return f"no vector named {name!r}; loaded: {', '.join(self.vectors) or 'none'}"
        try:
            value = float(text)
        except ValueError:
            return f"not a number: {text!r}"
        previous = self.strengths[name]
        self.strengths[name] = value
        try:
            self.apply_steering()
        except ValueError as error:
            self.strengths[name] = previous
            return f"refused: {error}"
        return f"{name} strength {value:+g} from the next message"

    def describe(self) -> str:
        if not self.vectors:
            return "no vectors loaded (start with --vector FILE[:STRENGTH])"
        lines = []
        for name, vector in self.vectors.items():
            recommended = vector.recommended_strength
            hint = f", recommended {recommended:g}" if recommended is not None else ""
            lines.append(f"{name}: strength {self.strengths[name]:+g}{hint} "
                         f"({vector.metadata.get('method', '?')}, {len(vector.layers)} layers)")
        return "\n".join(lines)

    def reply(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        try:
            prompt = chat_prompt(self.model, self.history)
        except ChatTemplateError as error:
            self.history.pop()  # the message is dropped: the conversation stays one the template accepts
            return f"({error})"
        (result,) = complete(self.model, prompt, [self.controls], self.sampling)
        answer = result.text.strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def chat_command(args) -> int:
    check_sampling_arguments(args)
    vectors = load_vectors(args.vector)
    model = load_model(args)
    try:
        session = ChatSession(model, vectors, args, sampling_kwargs(args))
    except ValueError as error:
        raise CliError(str(error)) from None
    print(f"chatting with {model.model_name}. {HELP}")
    if vectors:
        print(session.describe())
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        output = session.command(line) if line.startswith("/") else session.reply(line)
        print(output if line.startswith("/") else f"bot> {output}")
        sys.stdout.flush()
