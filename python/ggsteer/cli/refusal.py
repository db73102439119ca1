"""`ggsteer eval VECTOR --refusal`: refusal rates on held-out harmful and harmless requests and the
fluency cost, unsteered vs steered vs conditional (evaluate/refusal.py says what each one is).

    ggsteer eval refusal.gguf --refusal --model chat.gguf [--refusal-strength 1.5] [--layers 5-24]
                 [--condition-layer 4] [--max-tokens 24] [--json OUT.json]

Decisions:
- The strength defaults to the vector's recommended strength, else 1.0; --strengths is not used (a
  report per strength generates 96 replies each: benchmarks/refusal.py sweeps).
- The condition layer defaults to the layer just before the first steered layer: the condition must
  be decided before any steering acts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ggsteer.atomic_file import write_atomically
from ggsteer.cli.common import CliError, layers_argument, load_model
from ggsteer.steering.interventions import default_strength
from ggsteer.vectors import ControlVector


def add_refusal_arguments(parser) -> None:
    """The refusal options of `ggsteer eval`."""
    parser.add_argument("--refusal", action="store_true",
                        help="instead of the sweep: refusal rate on held-out harmful and harmless requests and KL, "
                             "unsteered vs steered vs conditional (steering only requests flagged as harmful)")
    parser.add_argument("--refusal-strength", type=float, default=None,
                        help="strength for --refusal (default: the vector's recommended strength, else 1.0)")
    parser.add_argument("--condition-layer", type=int, default=None,
                        help="layer whose mean prompt state decides the conditional setting (default: the layer "
                             "before the first steered one)")
    parser.add_argument("--max-tokens", type=int, default=24,
                        help="tokens generated per reply for --refusal (the judge reads the opening; default 24)")


def cmd_refusal(args) -> int:
    from ggsteer.cli.common import check_writable
    from ggsteer.evaluate.refusal import fit_condition, format_report, refusal_report

    check_writable(args.json, "--json")
    if args.max_tokens < 1:
        raise CliError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    vector = ControlVector.load(Path(args.vector))
    model = load_model(args)
    vector.check_model(model)
    layers = layers_argument(args.layers) or [il for il in (vector.recommended_layers or vector.layers)]
    condition_layer = min(layers) - 1 if args.condition_layer is None else args.condition_layer
    if not 0 <= condition_layer < min(layers):
        raise CliError(f"--condition-layer {condition_layer} must lie in 0..{min(layers) - 1}: before every steered "
                       f"layer (steering {min(layers)}..{max(layers)})")
    strength = default_strength(vector) if args.refusal_strength is None else args.refusal_strength
    condition = fit_condition(model, condition_layer)
    rows = refusal_report(model, vector, strength, condition=condition, layers=layers, raw=args.raw,
                          max_tokens=args.max_tokens)
    print(f"{Path(args.vector).name}: strength {strength:g}, layers {min(layers)}-{max(layers)}; condition at layer "
          f"{condition.layer}, cosine >= {condition.threshold:.4f} ({100 * condition.train_accuracy:.0f}% of "
          f"train requests on the right side)")
    print(format_report(rows))
    if args.json:
        report = {"strength": strength, "layers": layers, "condition_layer": condition.layer,
                  "condition_threshold": condition.threshold, "rows": [_row(r) for r in rows]}
        text = json.dumps(report, indent=1)
        write_atomically(args.json, lambda temp: Path(temp).write_text(text, encoding="utf-8"), overwrite=True,
                         what="--json")
    return 0


def _row(row) -> dict:
    data = asdict(row)
    return data | {"harmful_replies": list(row.harmful_replies), "harmless_replies": list(row.harmless_replies)}
