"""Plots of sweeps (matplotlib, the optional `ggsteer[plot]` extra)."""

from __future__ import annotations

from typing import Sequence

from ggsteer.evaluate.calibration import Calibration
from ggsteer.evaluate.sweeps import Sweep, format_layers
from ggsteer.extras import require

# -- plot -------------------------------------------------------------------------------------


def plot_sweeps(sweeps: Sequence[Sweep], path, *, title: str | None = None,
                calibration: Calibration | None = None) -> None:
    """Two panels against strength, one curve per layer range: behaviour (left) and KL (right); PNG."""
    require("matplotlib", "plot", "plotting sweeps")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not sweeps:
        raise ValueError("no sweeps to plot")
    # Figure + Agg canvas: no pyplot, so no global backend or window is touched
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    behaviour_axes, kl_axes = figure.subplots(1, 2, sharex=True)
    for sweep in sweeps:
        strengths = sweep.column("strength")
        line, = behaviour_axes.plot(strengths, sweep.column("behaviour"), marker="o", markersize=4, label=sweep.label)
        kl_axes.plot(strengths, sweep.column("kl"), marker="o", markersize=4, color=line.get_color(), label=sweep.label)
    # every layer range shares one unsteered model
    behaviour_axes.axhline(sweeps[0].baseline_behaviour, color="gray", linestyle=":", label="unsteered")
    if calibration is not None:
        chosen = [p for s in sweeps if s.layers == calibration.layers
                  for p in s.points if p.strength == calibration.strength]
        if chosen:
            label = f"calibrated: {calibration.strength:g} on layers {format_layers(calibration.layers)}"
            behaviour_axes.plot([calibration.strength], [chosen[0].behaviour], "k*", markersize=14, label=label)
            kl_axes.plot([calibration.strength], [chosen[0].kl], "k*", markersize=14, label=label)
            kl_axes.axhline(calibration.max_kl, color="gray", linestyle="--", linewidth=1,
                            label=f"KL bound {calibration.max_kl:g}")
    strength_label = "strength (1.0 = trained mean gap per layer)"
    behaviour_axes.set(xlabel=strength_label, ylabel="log P(positive) - log P(negative), nats",
                       title="Behaviour on held-out prompts")
    kl_axes.set(xlabel=strength_label, ylabel="KL(unsteered || steered) per token, nats",
                title="Fluency cost on neutral text")
    for axes in (behaviour_axes, kl_axes):
        axes.axvline(0, color="gray", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(path, format="png", dpi=110)
