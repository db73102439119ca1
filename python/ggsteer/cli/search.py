"""The strength search behind `ggsteer calibrate` (default) and `ggsteer eval --layer-sweep`: print
what was searched and how much work it took."""

from __future__ import annotations

import sys

from ggsteer.cli.common import CliError
from ggsteer.evaluate import DEFAULT_MAX_KL, format_layers, steered_layers
from ggsteer.evaluate.strength_search import Work, search_calibration


def ranges_that_can_win(job, raw: bool, grid: list[float], max_kl: float = DEFAULT_MAX_KL) -> list:
    """The layer ranges worth a full strength sweep: each range is first searched for its calibrated
    gain under the default KL budget (a fraction of a sweep's work), and only the best one is swept;
    the others are reported in a line each (a range with a smaller gain at the budget cannot win)."""
    results = []
    for layers in job.layer_ranges:
        label = format_layers(steered_layers(job.model, job.vector, layers, raw))
        try:
            _, calibration = search_calibration(job.model, job.vector, job.eval_items, grid,
                                                max_kl, layers=layers, raw=raw)
        except ValueError as error:
            print(f"layers {label}: {error}", file=sys.stderr)
            continue
        results.append((calibration.gain, layers, label, calibration))
    if not results:
        return job.layer_ranges
    best = max(results, key=lambda r: r[0])
    for gain, _, label, calibration in results:
        verdict = "the best: swept below" if gain == best[0] else "cannot win: not swept (--all-ranges sweeps it)"
        print(f"layers {label}: gain {gain:+.3f} at strength {calibration.strength:g} with KL {calibration.kl:.3f} "
              f"<= {max_kl:g} ({verdict})")
    return [best[1]]


def search_sweeps(job, raw: bool, max_kl: float):
    """The strength search on each layer range; the calibration with the largest gain among them."""
    sweeps, best, work = [], None, Work()
    for layers in job.layer_ranges:
        try:
            sweep, calibration = search_calibration(job.model, job.vector, job.eval_items, job.strengths, max_kl,
                                                    layers=layers, raw=raw, work=work)
        except ValueError as error:
            if len(job.layer_ranges) == 1:
                raise CliError(str(error)) from None
            label = format_layers(steered_layers(job.model, job.vector, layers, raw))
            print(f"layers {label}: {error}", file=sys.stderr)
            continue
        sweeps.append(sweep)
        best = calibration if best is None or calibration.gain > best.gain else best
    print(f"searched {len(job.strengths)} strengths: measured {sum(len(s.points) for s in sweeps)} "
          f"(KL from sampled positions), {work.logits_rows} logits rows, {work.tokens} tokens, {work.decodes} decodes; "
          "--full-sweep measures all", file=sys.stderr)
    if best is None:
        raise CliError(f"no layer range has a positive strength that raised the behaviour score with KL <= {max_kl:g}")
    return sweeps, best
