"""Chat formatting in one place: the model's chat template, the plain transcript for base models,
their stop strings, and BOS handling (ggsteer tokenizes with add_bos, so templates lose theirs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

TRANSCRIPT_HEADER = "A conversation between a curious user and a helpful assistant.\n\n"
# a base model continuing a transcript would go on to write the user's next turn
TRANSCRIPT_STOPS = ("\nUser:", "\n\n\n")


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (roles must alternate, ...)."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # to tokenize with add_bos (tokenize_prompt)
    stops: tuple[str, ...]  # stop strings the format needs
    strip_leading: bool  # the reply follows "Assistant:" and starts with a space to drop


def has_template(model) -> bool:
    return bool(model.metadata.get("tokenizer.chat_template"))


def chat_prompt(model, messages: Sequence[dict]) -> ChatPrompt:
    """The prompt for a conversation: the model's template if it has one, else a plain transcript."""
    if not has_template(model):
        return ChatPrompt(transcript(messages), TRANSCRIPT_STOPS, True)
    formatter, bos = _template_formatter(model)
    try:
        formatted = formatter(messages=list(messages))
    except Exception as error:  # noqa: BLE001 - templates raise what they like
        raise ChatTemplateError(f"the model's chat template refused these messages: {error}") from None
    stops = [formatted.stop] if isinstance(formatted.stop, str) else list(formatted.stop or [])
    return ChatPrompt(strip_bos(formatted.prompt, bos), tuple(stops), False)


def instruction_formatter(model) -> Callable[[str], str] | None:
    """A function wrapping one user instruction in the model's chat template, or None for base models."""
    if not has_template(model):
        return None
    formatter, bos = _template_formatter(model)

    def format_instruction(text: str) -> str:
        return strip_bos(formatter(messages=[{"role": "user", "content": text}]).prompt, bos)

    return format_instruction


def transcript(messages: Sequence[dict]) -> str:
    """Base models: "User:/Assistant:" turns ending in "Assistant:"; system messages replace the header."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    header = "\n".join(system) + "\n\n" if system else TRANSCRIPT_HEADER
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
             for m in messages if m["role"] != "system"]
    return header + "\n".join(turns) + "\nAssistant:"


def strip_bos(prompt: str, bos: str) -> str:
    # tokenize_prompt adds BOS itself: do not add it twice (bos is "" when the model adds none)
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt


def adds_bos(model) -> bool:
    """Whether tokenizing with add_bos puts a BOS token first (SmolLM2's vocabulary says not to)."""
    return model.tokenize(b"a", add_bos=True, special=False) != model.tokenize(b"a", add_bos=False, special=False)


def _template_formatter(model):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
    eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
    template = model.metadata["tokenizer.chat_template"]
    # the template writes BOS as text; only a tokenizer that adds BOS itself needs it stripped
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos), bos if adds_bos(model) else ""
