"""Is there a better direction than the trained one at equal KL? A probe of the directions a preset's
training pairs offer besides ggsteer's default, and of the best combination of them.

    python benchmarks/direction_probe.py [--model PATH] [--presets happy,calm,honest] [--pairs 288]
                                         [--families suffix,ending,last,spread,neutral] [--probe-strength 0.2]
                                         [--max-kl 0.25] [--threads 2] [--json OUT.json]

The first `--pairs` pairs (training order) are read once at every token of the default steering
layers, and give one direction per layer for each family:

- suffix: the mean difference over the suffix pool (ggsteer's default direction);
- ending: the mean difference over the whole ending a pair shares, opening included;
- last: the mean difference at the last token (repeng's reading);
- spread: the top principal component of the pair differences around their mean;
- neutral: the mean residual state of the shipped neutral texts.

Each family is made orthogonal, layer by layer, to the families before it and scaled to the default's
norm, so the coefficients a give the direction sum_i a_i e_i (added on the default layers). For small
pushes the behaviour move is linear in a (g . a) and the KL quadratic (a' F a): g comes from each
family added at +-`--probe-strength`, F from each family and each pair of families, all on the
scoring half of the preset's eval prompts (as `ggsteer tune` splits them). The best direction at
equal KL is a ~ F^-1 g, and sqrt(g' F^-1 g) / (g_0 / sqrt(F_00)) its predicted gain over the default.
That direction is then brought to the KL budget and compared with the default on the report half at
equal KL, exactly as `ggsteer tune` reports (evaluate/tune_report.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from _common import machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.evaluate import DEFAULT_MAX_KL
from ggsteer.evaluate.fluency import load_neutral_texts, neutral_tokens
from ggsteer.evaluate.tune import CANDIDATES_PER_PASS, EDGE_MARGIN, Setting, measure, split_prompts
from ggsteer.evaluate.tune_report import next_strength, report
from ggsteer.train import get_preset, load_eval_prompts, preset_dataset
from ggsteer.train.extract import pair_pools, shared_ending
from ggsteer.train.rounds import balanced_order
from ggsteer.vectors import ControlVector, default_steering_layers

FAMILIES = ("suffix", "ending", "last", "spread", "neutral")
FLOOR_STRENGTH = 1e-4


@dataclass(frozen=True)
class Candidate(Setting):
    direction: int = 0  # index into the probe's list of vectors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--presets", default="happy,calm,honest")
    parser.add_argument("--pairs", type=int, default=288, help="training pairs read (default %(default)s)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="the first one is the default direction")
    parser.add_argument("--probe-strength", type=float, default=0.2, help="coefficient of each probe push")
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    model = SteeredModel(args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048)
    families = args.families.split(",")
    print(f"{machine_line()}; {model.model_name}; families {families}", file=sys.stderr)
    rows, records = [], []
    for preset in args.presets.split(","):
        started = time.perf_counter()
        record = probe(model, preset, families, args)
        record["seconds"] = time.perf_counter() - started
        records.append(record)
        rows.append(row_of(record))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(f"direction probe on {model.model_name} ({machine_line()}), KL <= {args.max_kl:g}",
                ["preset", "move/sqrt(KL) per family, vs default", "coefficients", "predicted (scoring)",
                 "default at equal KL", "best", "ratio [10-90%] (report)", "s"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return 0


def probe(model: SteeredModel, preset: str, families: list[str], args) -> dict:
    layers = default_steering_layers(model.n_layer)
    basis = orthogonal_basis([family_directions(model, preset, layers, args.pairs)[f] for f in families])
    pair_sums = [basis[i] + basis[j] for i, j in itertools.combinations(range(len(basis)), 2)]
    # the basis, the best combination (filled in below), then the pairs local_model measures
    vectors = [control_vector(model, layers, e) for e in [*basis, basis[0], *pair_sums]]
    score_items, report_items = split_prompts(load_eval_prompts(preset))
    neutral = neutral_tokens(model, None)

    def run(candidates, items):
        moves, kls = [], []
        for start in range(0, len(candidates), CANDIDATES_PER_PASS):
            chunk = candidates[start : start + CANDIDATES_PER_PASS]
            more, more_kls = measure(model, [vectors[c.direction] for c in chunk], chunk, items, neutral, raw=True)
            moves.append(more)
            kls.extend(more_kls)
        return np.concatenate(moves), np.array(kls)

    g, fisher, floor_kl = local_model(lambda candidates: run(candidates, score_items), layers, len(basis),
                                      args.probe_strength)
    coefficients = np.linalg.solve(fisher, g)
    coefficients /= coefficients[0]
    predicted = float(np.sqrt(g @ np.linalg.solve(fisher, g)) / (g[0] / np.sqrt(fisher[0, 0])))
    vectors[len(basis)] = control_vector(model, layers, sum(a * e for a, e in zip(coefficients, basis)))
    target = EDGE_MARGIN * args.max_kl
    default = Candidate("add", "all", tuple(layers), round(float(np.sqrt((target - floor_kl) / fisher[0, 0])), 4), 0)
    best = Candidate("add", "all", tuple(layers),
                     round(float(np.sqrt((target - floor_kl) / (coefficients @ fisher @ coefficients))), 4), len(basis))
    _, kls = run([best], score_items)  # the quadratic KL is a small-push estimate: one secant step to the budget
    best = replace(best, strength=next_strength([(best.strength, float(kls[0]), None)], target) or best.strength)
    result = report(lambda candidates: run(candidates, report_items), default, best, seed=0)
    return {"preset": preset, "families": families, "g": g.tolist(), "fisher": fisher.tolist(),
            "coefficients": coefficients.tolist(), "predicted": predicted, "floor_kl": floor_kl,
            "per_family": (g / np.sqrt(np.diag(fisher)) / (g[0] / np.sqrt(fisher[0, 0]))).tolist(),
            "report": {"default_move": result.matched_move, "default_kl": result.matched_kl,
                       "best_move": result.tuned_move, "best_kl": result.tuned_kl, "ratio": result.ratio,
                       "spread": list(result.ratio_spread)}}


def local_model(run, layers, k: int, strength: float) -> tuple[np.ndarray, np.ndarray, float]:
    """g (move per unit coefficient, from +-strength) and F (KL = floor + a' F a) on the first k
    basis vectors, and the floor; combinations i+j are probe vectors k + 1 + index of (i, j)."""
    pairs = list(itertools.combinations(range(k), 2))
    singles = [Candidate("add", "all", tuple(layers), sign * strength, i) for i in range(k) for sign in (1, -1)]
    # a push of any size reads a KL floor on a quantized model (measured), which a' F a must not absorb
    floor = Candidate("add", "all", tuple(layers), FLOOR_STRENGTH, 0)
    moves, kls = run(singles + [Candidate("add", "all", tuple(layers), strength, k + 1 + n) for n in range(len(pairs))]
                     + [floor])
    floor_kl = float(kls[-1])
    kls = kls[:-1] - floor_kl
    g = np.array([(moves[2 * i] - moves[2 * i + 1]).mean() / (2 * strength) for i in range(k)])
    fisher = np.diag([(kls[2 * i] + kls[2 * i + 1]) / (2 * strength**2) for i in range(k)])
    for n, (i, j) in enumerate(pairs):
        fisher[i, j] = fisher[j, i] = (kls[2 * k + n] / strength**2 - fisher[i, i] - fisher[j, j]) / 2
    return g, fisher, floor_kl


def family_directions(model: SteeredModel, preset: str, layers: list[int], n_pairs: int) -> dict[str, np.ndarray]:
    """Each family's [len(layers), n_embd] direction (module docstring)."""
    entries = preset_dataset(preset, chat_template=model.chat_instruction_formatter())
    order = balanced_order(len(entries), len(get_preset(preset).positive_personas))[:n_pairs]
    prompts = [text for i in order for text in (entries[i].positive, entries[i].negative)]
    tokens = [model.tokenize_prompt(prompt) for prompt in prompts]
    endings = [max(len(shared_ending(a, b)), 1) for a, b in zip(tokens[0::2], tokens[1::2]) for _ in range(2)]
    states = model.hidden_states(prompts, layers=layers, pool="all", progress=False)

    def difference(counts):
        pooled = np.stack([s[-k:].mean(axis=0) for s, k in zip(states, counts)]).astype(np.float64)
        return pooled[0::2] - pooled[1::2]

    suffix = difference(pair_pools(model, prompts, "suffix"))
    neutral = np.concatenate(model.hidden_states(load_neutral_texts(), layers=layers, pool="all", progress=False))
    centred = suffix - suffix.mean(axis=0)
    spread = np.stack([np.linalg.svd(centred[:, k], full_matrices=False)[2][0] for k in range(len(layers))])
    return {"suffix": suffix.mean(axis=0), "ending": difference(endings).mean(axis=0),
            "last": difference([1] * len(prompts)).mean(axis=0), "spread": spread,
            "neutral": neutral.astype(np.float64).mean(axis=0)}


def orthogonal_basis(directions: list[np.ndarray]) -> list[np.ndarray]:
    """Gram-Schmidt layer by layer, each scaled to the first direction's norm and signed to agree with it."""
    norms = np.linalg.norm(directions[0], axis=1, keepdims=True)
    basis = []
    for direction in directions:
        e = direction.copy()
        for b in basis:
            e -= np.sum(e * b, axis=1, keepdims=True) / np.sum(b * b, axis=1, keepdims=True) * b
        e *= norms / np.linalg.norm(e, axis=1, keepdims=True)
        basis.append(e if np.sum(e * directions[0]) >= 0 else -e)
    return basis


def control_vector(model: SteeredModel, layers: list[int], rows: np.ndarray) -> ControlVector:
    return ControlVector({il: rows[k].astype(np.float32) for k, il in enumerate(layers)}, model.model_hint,
                         {"layers": list(layers)})


def row_of(record: dict) -> list[str]:
    low, high = record["report"]["spread"]
    result = record["report"]
    return [record["preset"], " ".join(f"{v:+.2f}" for v in record["per_family"]),
            " ".join(f"{v:+.2f}" for v in record["coefficients"]), f"{record['predicted']:.2f}",
            f"{result['default_move']:+.2f} at KL {result['default_kl']:.3f}",
            f"{result['best_move']:+.2f} at KL {result['best_kl']:.3f}",
            f"{result['ratio']:.2f} [{low:.2f}-{high:.2f}]", f"{record['seconds']:.0f}"]


if __name__ == "__main__":
    raise SystemExit(main())
