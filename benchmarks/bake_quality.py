"""How close an approximate bake on the default model (Gemma 3 270M, Q4_K_M) comes to runtime steering.

Trains the `happy` preset (or loads --vector), then for each setting compares three models: the
original unsteered, the original ablated at run time (ggsteer's hook), and the
baked file loaded with no steering. Prints, per setting:
- KL(runtime-steered || baked) and KL(unsteered || baked) over the shipped neutral texts (nats per
  position), next to KL(unsteered || runtime-steered);
- the mean behaviour score (log P(positive) - log P(negative), happy eval prompts) of each;
- for ablate: the spread (std over held-out prompts, last token) of the projection on each steered
  layer's direction, original vs baked vs hook, and the ratio;
- a greedy sample of each, the baked one from a plain llama_cpp.Llama (no ggsteer).

    python benchmarks/bake_quality.py [--vector happy.gguf] [--layers 3-14]

Add is refused on Gemma 3. The measurement behind that (an offset on the token embeddings, the one
unnormalised entry into its residual stream) was made with this script at commit f8f3df9, where the
bake still wrote that offset and the script compared it with runtime addition at --strength.

GGSTEER_BENCH_NO_EXTRA_BUFTS=1 loads models without llama.cpp's extra CPU buffer types (AMX /
repacked weights): on a VM that lists AMX but cannot run it, batched decodes otherwise die with an
illegal instruction.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np
from _common import load_models_without_extra_buffers

from ggsteer import ControlVector, SteeredModel, default_model_path, preset_dataset
from ggsteer.bake import bake_model
from ggsteer.evaluate import behaviour_scores, load_neutral_texts
from ggsteer.train import load_eval_prompts
from ggsteer.vectors import parse_layer_range

PROMPT = "I woke up this morning and"


if os.environ.get("GGSTEER_BENCH_NO_EXTRA_BUFTS"):
    load_models_without_extra_buffers()
MODEL_KWARGS = dict(n_ctx=1024, n_batch=512, n_seq_max=16, n_threads=2)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def position_logprobs(model: SteeredModel, texts: list[str]) -> list[np.ndarray]:
    out = []
    for text in texts:
        model.reset()
        tokens = model.tokenize_prompt(text)
        model.eval(tokens)
        out.append(log_softmax(np.asarray(model.scores[: len(tokens)], dtype=np.float64)))
    return out


def mean_kl(p_logs: list[np.ndarray], q_logs: list[np.ndarray]) -> float:
    kls = [(np.exp(p) * (p - q)).sum(axis=-1) for p, q in zip(p_logs, q_logs)]
    return float(np.concatenate(kls).mean())


def projection_spread(model: SteeredModel, vector: ControlVector, layers: list[int], prompts: list[str]) -> np.ndarray:
    states = model.hidden_states(prompts, layers=layers, pool="last")  # [n_prompts, n_layers, n_embd]
    units = np.stack([vector.directions[il] / np.linalg.norm(vector.directions[il]) for il in layers])
    projections = np.einsum("pld,ld->pl", np.asarray(states, np.float64), units)
    return projections.std(axis=0)


def plain_sample(path: Path) -> str:
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    text = llm.create_completion(PROMPT, max_tokens=32, temperature=0.0, repeat_penalty=1.3)["choices"][0]["text"]
    llm.close()
    return text


def steered_sample(model: SteeredModel) -> str:
    return model.create_completion(PROMPT, max_tokens=32, temperature=0.0, repeat_penalty=1.3)["choices"][0]["text"]


def train_or_load(model: SteeredModel, path: str | None) -> ControlVector:
    """The vector at `path`; trained on the happy preset (and saved there) when the file does not exist."""
    if path and Path(path).exists():
        return ControlVector.load(path)
    vector = ControlVector.train(model, preset_dataset("happy"), progress=False)
    if path:
        vector.save(path)
    return vector


class Pair:
    """One model file opened twice: for behaviour and hidden states, and with logits at every position for KL."""

    def __init__(self, path: Path):
        self.model = SteeredModel(path, **MODEL_KWARGS)
        self.kl_model = SteeredModel(path, logits_all=True, **MODEL_KWARGS)

    @contextlib.contextmanager
    def steer(self, *args, **kwargs):
        with self.model.steer(*args, **kwargs), self.kl_model.steer(*args, **kwargs):
            yield self

    def measure(self, texts, items, vector=None, layers=None, held_out=None) -> dict:
        result = {"logs": position_logprobs(self.kl_model, texts),
                  "score": float(behaviour_scores(self.model, items).mean()),
                  "sample": steered_sample(self.model)}
        if held_out is not None:
            result["spread"] = projection_spread(self.model, vector, layers, held_out)
        return result

    def close(self) -> None:
        self.model.close()
        self.kl_model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vector", help="vector file (trained on the happy preset and saved there if missing)")
    parser.add_argument("--texts", type=int, default=None, help="use only the first N neutral texts")
    parser.add_argument("--layers", default="3-14")
    args = parser.parse_args()
    layers = parse_layer_range(args.layers)
    model_path = default_model_path()
    original = Pair(model_path)
    vector = train_or_load(original.model, args.vector)
    texts = load_neutral_texts()[: args.texts]
    items = load_eval_prompts("happy")
    held_out = [item["prompt"] for item in items]
    base = original.measure(texts, items, vector, layers, held_out)
    print(f"unsteered: behaviour {base['score']:+.3f}; sample: {base['sample']!r}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="ggsteer-bake-"))

    with original.steer(vector, 1.0, layers=layers, op="ablate"):
        runtime = original.measure(texts, items, vector, layers, held_out)
    out = folder / "ablate.gguf"
    report = bake_model(model_path, out, ablate=[vector], layers=layers, approximate=True)
    baked = compare(f"ablate (layers {args.layers})", out, texts, items, base, runtime, report, vector, layers,
                    held_out)
    print("  projection spread (std over held-out prompts, last token) per layer: original / hook / baked")
    for k, il in enumerate(layers):
        print(f"    layer {il:>2}: {base['spread'][k]:10.2f} {runtime['spread'][k]:10.2f} {baked['spread'][k]:10.2f}"
              f"   baked/original {baked['spread'][k] / base['spread'][k]:.3f}")
    for name, result in (("hook", runtime), ("baked", baked)):
        ratio = result["spread"] / base["spread"]
        print(f"  {name}/original spread: median {np.median(ratio):.3f}, range {ratio.min():.3f}-{ratio.max():.3f}")

    original.close()


def compare(title, path, texts, items, base, runtime, report, vector=None, layers=None, held_out=None) -> dict:
    baked_pair = Pair(path)
    baked = baked_pair.measure(texts, items, vector, layers, held_out)
    baked_pair.close()
    print(f"\n{title}: bake took {report.seconds:.1f} s, {report.output_bytes / 1e6:.1f} MB "
          f"(original {report.input_bytes / 1e6:.1f} MB)")
    print(f"  KL(unsteered || runtime) {mean_kl(base['logs'], runtime['logs']):.3f}   KL(unsteered || baked) "
          f"{mean_kl(base['logs'], baked['logs']):.3f}   "
          f"KL(runtime || baked) {mean_kl(runtime['logs'], baked['logs']):.3f}")
    print(f"  behaviour: unsteered {base['score']:+.3f}   runtime {runtime['score']:+.3f}   "
          f"baked {baked['score']:+.3f}")
    print(f"  runtime sample: {runtime['sample']!r}")
    print(f"  baked sample (plain llama_cpp.Llama): {plain_sample(path)!r}", flush=True)
    return baked


if __name__ == "__main__":
    main()
