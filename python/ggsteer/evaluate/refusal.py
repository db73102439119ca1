"""Refusal steering (anti-jailbreak): does a vector make the model decline harmful requests, and
only those?

- Requests: the shipped sets of harmful and harmless chat requests (`refusal_requests.json`), a
  `train` split for the harmful-request condition and an `eval` split held out from all training.
- Judge: a reply is a refusal when its opening contains one of the refusal phrases the jailbreak
  literature matches on ("I'm sorry", "I cannot", "As an AI", ...). It reads only the text: it
  shares nothing with the steering it judges.
- Settings: unsteered; steered (the vector added on every request); conditional (CAST: the same
  addition only on requests whose mean state at the condition layer has at least the threshold's
  cosine with the harmful-minus-harmless direction).
- Report: the refusal rate on the held-out harmful and harmless requests (greedy replies through
  the model's chat template) and the fluency cost of each setting (KL on neutral text,
  evaluate/fluency.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

import numpy as np

from ggsteer import chat_format
from ggsteer.evaluate.fluency import fluency_costs, neutral_tokens
from ggsteer.evaluate.refusal_judge import is_refusal, refusal_rate  # noqa: F401 - part of this API
from ggsteer.model import SteeredModel
from ggsteer.train import DatasetEntry, train_vector
from ggsteer.vectors import ControlVector

REQUESTS_FILE = "refusal_requests.json"
SPLITS = ("train", "eval")


# -- the requests ---------------------------------------------------------------------------


def load_refusal_requests(split: str = "eval") -> tuple[list[str], list[str]]:
    """(harmful, harmless) requests of one split ("train" or "eval")."""
    if split not in SPLITS:
        raise ValueError(f"unknown refusal split {split!r}: use one of {', '.join(SPLITS)}")
    data = json.loads(resources.files("ggsteer.data").joinpath(REQUESTS_FILE).read_text(encoding="utf-8"))
    part = data[split]
    return list(part["harmful"]), list(part["harmless"])


def chat_prompts(model: SteeredModel, requests: Sequence[str]) -> list[chat_format.ChatPrompt]:
    """Each request as a one-turn conversation in the model's chat format."""
    return [chat_format.chat_prompt(model, [{"role": "user", "content": text}]) for text in requests]


# -- the condition (CAST) -------------------------------------------------------------------


def harmful_condition_vector(model: SteeredModel, layers: Sequence[int]) -> ControlVector:
    """The harmful-minus-harmless direction of mean prompt states (train split, chat format)."""
    harmful, harmless = load_refusal_requests("train")
    entries = [DatasetEntry(a.text, b.text)
               for a, b in zip(chat_prompts(model, harmful), chat_prompts(model, harmless))]
    return train_vector(model, entries, layers=list(layers), pool="mean", progress=False)


def condition_cosines(model: SteeredModel, condition: ControlVector, layer: int, requests: Sequence[str]) -> np.ndarray:
    """Cosine between each request's mean prompt state at `layer` and the condition's direction."""
    states = model.hidden_states([p.text for p in chat_prompts(model, requests)], layers=[layer], pool="mean")[:, 0]
    direction = condition.directions[layer]
    return states @ direction / (np.linalg.norm(states, axis=1) * np.linalg.norm(direction))


def choose_threshold(harmful: np.ndarray, harmless: np.ndarray) -> float:
    """The cosine threshold that best separates the two sets (ties: the midpoint of the widest gap)."""
    values = np.sort(np.concatenate([harmful, harmless]))
    candidates = (values[:-1] + values[1:]) / 2
    if candidates.size == 0:
        raise ValueError("need at least two cosines to choose a threshold")
    correct = [(harmful >= t).sum() + (harmless < t).sum() for t in candidates]
    best = np.flatnonzero(np.array(correct) == max(correct))
    gaps = values[best + 1] - values[best]
    return float(candidates[best[int(np.argmax(gaps))]])


@dataclass(frozen=True)
class Condition:
    vector: ControlVector
    threshold: float
    layer: int
    train_accuracy: float  # share of train requests on the right side of the threshold

    def as_tuple(self) -> tuple[ControlVector, float, int]:
        return self.vector, self.threshold, self.layer


def fit_condition(model: SteeredModel, layer: int) -> Condition:
    """Train the harmful-request condition at `layer` and its threshold on the train split."""
    harmful, harmless = load_refusal_requests("train")
    vector = harmful_condition_vector(model, [layer])
    on_harmful = condition_cosines(model, vector, layer, harmful)
    on_harmless = condition_cosines(model, vector, layer, harmless)
    threshold = choose_threshold(on_harmful, on_harmless)
    accuracy = ((on_harmful >= threshold).sum() + (on_harmless < threshold).sum()) / (len(harmful) + len(harmless))
    return Condition(vector, threshold, layer, float(accuracy))


# -- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RefusalRow:
    setting: str  # "unsteered", "steered" or "conditional"
    harmful_rate: float  # share of held-out harmful requests refused
    harmless_rate: float  # share of held-out harmless requests refused
    kl: float  # mean KL(unsteered || setting) on the neutral texts, nats
    harmful_replies: tuple[str, ...] = field(repr=False, default=())
    harmless_replies: tuple[str, ...] = field(repr=False, default=())


def generate_replies(model: SteeredModel, requests: Sequence[str], controls, max_tokens: int) -> list[str]:
    """Greedy replies to each request through the chat template, every one under `controls`."""
    prompts = chat_prompts(model, requests)
    stops = sorted({stop for prompt in prompts for stop in prompt.stops})
    texts, size = [], model.n_seq_max
    for start in range(0, len(prompts), size):
        chunk = [p.text for p in prompts[start:start + size]]
        texts += model.generate_batch(chunk, [controls] * len(chunk), max_tokens=max_tokens, temperature=0.0,
                                      stop=stops or None)
    return [text.strip() for text in texts]


def refusal_report(model: SteeredModel, vector: ControlVector, strength: float, *,
                   condition: Condition | None = None, layers: Sequence[int] | None = None,
                   raw: bool = False, max_tokens: int = 24, split: str = "eval",
                   texts: Sequence[str] | None = None) -> list[RefusalRow]:
    """Refusal rates on the split's harmful and harmless requests and KL on neutral text: unsteered,
    steered (`vector` at `strength` on every request) and, given a `condition`, conditional."""
    harmful, harmless = load_refusal_requests(split)
    settings = {"unsteered": [], "steered": model.intervention(vector, strength, layers=layers, raw=raw)}
    if condition is not None:
        settings["conditional"] = model.intervention(vector, strength, layers=layers, raw=raw,
                                                     condition=condition.as_tuple())
    rows = []
    for name, controls in settings.items():
        kl = 0.0 if name == "unsteered" else _kl(model, [controls], texts)
        on_harmful = generate_replies(model, harmful, controls or None, max_tokens)
        on_harmless = generate_replies(model, harmless, controls or None, max_tokens)
        rows.append(RefusalRow(name, refusal_rate(on_harmful), refusal_rate(on_harmless), kl,
                               tuple(on_harmful), tuple(on_harmless)))
    return rows


def _kl(model: SteeredModel, controls: list, texts: Sequence[str] | None) -> float:
    costs, _ = fluency_costs(model, neutral_tokens(model, texts), [controls])
    return costs[0].kl


def format_report(rows: Sequence[RefusalRow]) -> str:
    """The report as a table: refusal rates in percent, KL in nats."""
    lines = [f"{'setting':<12} {'harmful refused':>16} {'harmless refused':>17} {'KL (nats)':>10}"]
    for row in rows:
        lines.append(f"{row.setting:<12} {100 * row.harmful_rate:>15.0f}% {100 * row.harmless_rate:>16.0f}% "
                     f"{row.kl:>10.3f}")
    return "\n".join(lines)
