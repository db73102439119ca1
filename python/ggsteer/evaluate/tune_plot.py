"""Plot of a tune: every candidate's behaviour gain against its KL, the Pareto front, the budget
(matplotlib, the optional `ggsteer[plot]` extra)."""

from __future__ import annotations

from ggsteer.atomic_file import write_atomically
from ggsteer.evaluate.tune import TuneResult
from ggsteer.extras import require


def plot_front(result: TuneResult, path, *, title: str | None = None) -> None:
    """Scatter of gain (scoring split) against KL, per op; the front as a line; written atomically (PNG)."""
    require("matplotlib", "plot", "plotting the Pareto front")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for op in sorted({t.setting.op for t in result.trials}):
        trials = [t for t in result.trials if t.setting.op == op]
        axes.scatter([t.kl for t in trials], [t.gain for t in trials], s=16, label=op)
    axes.plot([t.kl for t in result.front], [t.gain for t in result.front], color="black", linewidth=1, label="front")
    axes.scatter([result.default.kl], [result.default.gain], marker="s", s=50, color="black", label="default")
    if result.chosen is not None:
        axes.scatter([result.chosen.kl], [result.chosen.gain], marker="*", s=120, color="red", label="chosen")
    axes.axvline(result.max_kl, color="grey", linestyle="--", linewidth=1, label=f"KL budget {result.max_kl:g}")
    axes.set_xscale("symlog", linthresh=0.01)
    axes.set_xlabel("KL(unsteered || steered) on neutral text, nats per token")
    axes.set_ylabel("behaviour gain on the scoring prompts, nats")
    if title:
        axes.set_title(title)
    axes.legend(fontsize=8)
    write_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=110), overwrite=True)
