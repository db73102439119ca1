"""ggsteer vs repeng: training time and agreement of the directions, same model, data and machine.

    python benchmarks/repeng_compare.py [--suffixes 24] [--rounds 3] [--per-layer]
    python benchmarks/repeng_compare.py --default-training [--rounds 2]

Needs repeng, torch, transformers, gguf and accelerate next to ggsteer (a CPU torch is enough):

    pip install "ggsteer[repeng]"     # or: pip install torch repeng transformers gguf accelerate

Without them the script says so and exits 0.

Both sides read the same GGUF file (the default model, Gemma 3 270M Q4_K_M, unless --model is
given): ggsteer through llama.cpp, repeng through a Hugging Face model that transformers loads from
that file, de-quantised to float32. Two datasets: (a) template+suffix pairs, `preset_dataset("happy")`
over the first N suffixes; (b) repeng-style truncated replies (benchmarks/train.py's
`truncated_dataset()`). Timed: `ggsteer.ControlVector.train(method="pca_center")` and "mean_diff"
(ggsteer's default layers, each prompt read at its last token as repeng reads it) against
`repeng.ControlVector.train(method="pca_center", batch_size=32)` on a `repeng.ControlModel` (repeng's
default layers, 1..n_layer-1), after a warm-up call on each side. Paired and alternated: each round
runs repeng, then ggsteer pca_center, then repeng again and ggsteer mean_diff, the order of the two
pairs rotating each round; the table gives the median of the paired speed-ups and their range.
Model loading is not timed.

`--default-training` compares what a user of each gets for one vector instead: ggsteer's default
training (`ggsteer train --preset happy`: rounds that stop when the direction is stable, at most 288
of the preset's 1,536 pairs, the default "suffix" pool) against repeng's pca_center on every pair,
repeng first in each round; agreement is taken at ggsteer's recommended layers with repeng's mean
difference and its pca_center (repeng reads the last token, so they differ by the pool as well).

Agreement: per-layer |cos| between ggsteer's and repeng's pca_center directions. repeng's layer id i
reads `hidden_states[i + 1]`, the output of block i, which is ggsteer's layer i (docs/methods.md,
"Conventions"). The last layer differs by design: Hugging Face's last hidden state has passed the final
norm, llama.cpp's `l_out-(n_layer-1)` has not; it is reported on its own. repeng's PCA uses sklearn's
unseeded randomized solver at these sizes (repeng issue #78), so its side may vary slightly between
runs (on Gemma 3 270M two runs agreed to 4 decimals). The rest of the gap is llama.cpp's quantised
arithmetic against float32 de-quantised weights in torch. ggsteer's mean_diff is compared with the
mean of the positive-minus-negative hidden states
repeng computed in the same call (repeng has no mean_diff method; the states are caught through
read_representations' `transform_hiddens` hook, which costs one copy).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # repeng's progress bars; tqdm reads this when imported

import time
from pathlib import Path

import numpy as np
from _common import machine_line, paired_times, print_table, ratio_cells
from train import truncated_dataset

from ggsteer import SteeredModel, default_model_path
from ggsteer.train import get_preset, preset_dataset
from ggsteer.train.rounds import train_in_rounds
from ggsteer.vectors import ControlVector


def _import_repeng():
    """(torch, transformers, repeng), or None with the reason printed."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        import repeng
        import torch
        import transformers
    except ImportError as exc:
        print(f"repeng comparison skipped: {exc.name or exc} is not importable "
              f"(pip install torch repeng transformers gguf accelerate)")
        return None
    return torch, transformers, repeng


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class RepengSide:
    """A Hugging Face model read from the same GGUF file, wrapped in repeng's ControlModel."""

    def __init__(self, torch, transformers, repeng, model_path: Path, n_threads: int):
        self.torch, self.repeng = torch, repeng
        torch.set_num_threads(n_threads)
        start = time.perf_counter()
        kwargs = {"gguf_file": model_path.name}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path.parent), **kwargs)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(model_path.parent), torch_dtype=torch.float32,
                                                                     **kwargs)
        hf_model.eval()
        self.n_layer = int(hf_model.config.num_hidden_layers)
        # repeng's README wraps the layers it will steer; these are also read_representations' defaults
        self.model = repeng.ControlModel(hf_model, list(range(-1, -self.n_layer, -1)))
        self.load_seconds = time.perf_counter() - start
        self.hiddens: dict[int, np.ndarray] = {}

    def warm_up(self, prompts: list[str]) -> None:
        with self.torch.inference_mode():
            self.model(**self.tokenizer(prompts, padding=True, return_tensors="pt"), output_hidden_states=True)

    def _keep_hiddens(self, hiddens: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        # pca_center centres the arrays in place afterwards: keep copies
        self.hiddens = {layer: h.copy() for layer, h in hiddens.items()}
        return hiddens

    def train(self, pairs, batch_size: int):
        dataset = [self.repeng.DatasetEntry(positive=e.positive, negative=e.negative) for e in pairs]
        return self.repeng.ControlVector.train(self.model, self.tokenizer, dataset, method="pca_center",
                                               batch_size=batch_size, transform_hiddens=self._keep_hiddens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--suffixes", type=int, default=24, help="suffixes for the preset dataset (24: 72 pairs)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (repeng, ggsteer) per method")
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch on both sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads on both sides")
    parser.add_argument("--per-layer", action="store_true", help="also print |cos| for every layer")
    parser.add_argument("--default-training", action="store_true",
                        help="instead: ggsteer's default training (rounds) on the whole happy preset against "
                             "repeng on every pair of it")
    args = parser.parse_args()

    modules = _import_repeng()
    if modules is None:
        return

    model_path = Path(default_model_path() if args.model is None else args.model)
    n_threads = args.threads
    model = SteeredModel(str(model_path), n_threads=n_threads, n_seq_max=args.batch)
    rep = RepengSide(*modules, model_path, n_threads)
    if rep.n_layer != model.n_layer:
        sys.exit(f"layer counts differ: llama.cpp {model.n_layer}, transformers {rep.n_layer}")
    n = model.n_layer
    inner = list(range(1, n - 1))  # layers 1..n-2: same tensor on both sides
    print(f"model {model.model_name} ({model_path.name}), {n} layers, n_embd {model.n_embd}; "
          f"transformers loaded it in {rep.load_seconds:.1f} s (not timed below); "
          f"torch threads {modules[0].get_num_threads()}, llama.cpp threads {n_threads}; "
          f"tokenizer padding side {rep.tokenizer.padding_side}")

    datasets = {
        f"preset happy, {args.suffixes} suffixes": preset_dataset("happy", max_suffixes=args.suffixes),
        "repeng-style truncated replies": truncated_dataset(),
    }
    warm = ["warm up the weights", "and the threads, twice over"]
    model.hidden_states(warm)
    rep.warm_up(warm)
    if args.default_training:
        default_training_table(model, rep, args)
        model.close()
        return

    rows, layer_rows = [], []
    for name, pairs in datasets.items():
        n_prompts = 2 * len(pairs)
        results = {}

        def run_ggsteer(method, results=results, pairs=pairs):
            results[method] = ControlVector.train(model, pairs, method=method, pool="last",  # as repeng reads them
                                                  batch_size=args.batch, progress=False)

        def run_repeng(results=results, pairs=pairs):
            results["repeng"] = rep.train(pairs, args.batch)

        timed = paired_times({"pca_center": (run_repeng, lambda: run_ggsteer("pca_center")),
                              "mean_diff": (run_repeng, lambda: run_ggsteer("mean_diff"))}, args.rounds)
        speedups = {method: [1 / r for r in ratios] for method, (ratios, _, _) in timed.items()}
        t_pca = float(np.median(timed["pca_center"][2]))
        t_mean = float(np.median(timed["mean_diff"][2]))
        t_rep = float(np.median(timed["pca_center"][1] + timed["mean_diff"][1]))

        g_pca, g_mean, r_pca = results["pca_center"], results["mean_diff"], results["repeng"]
        missing = sorted(set(range(1, n)) - set(r_pca.directions))
        if missing:
            sys.exit(f"repeng returned no direction for layers {missing}")
        shared = [il for il in range(1, n) if il in g_pca.directions]
        cos_pca = {il: _cos(g_pca.directions[il], r_pca.directions[il]) for il in shared}
        r_mean = {il: (h[0::2] - h[1::2]).mean(axis=0) for il, h in rep.hiddens.items()}
        cos_mean = {il: _cos(g_mean.directions[il], r_mean[il]) for il in shared}
        inner_pca = [cos_pca[il] for il in inner]
        inner_mean = [cos_mean[il] for il in inner]
        last_pca = f"{cos_pca[n - 1]:.3f}" if n - 1 in cos_pca else "not trained"
        last_mean = f"{cos_mean[n - 1]:.3f}" if n - 1 in cos_mean else "not trained"
        rows.append([name, str(n_prompts), f"{t_pca:.2f}", f"{t_mean:.2f}", f"{t_rep:.2f}",
                     *ratio_cells(speedups["pca_center"]), *ratio_cells(speedups["mean_diff"]),
                     f"{np.median(inner_pca):.4f}", f"{min(inner_pca):.4f}", last_pca,
                     f"{np.median(inner_mean):.4f}", last_mean])
        for il in shared:
            layer_rows.append([name, str(il), f"{cos_pca[il]:.4f}", f"{cos_mean[il]:.4f}"])

    print_table(
        f"ggsteer vs repeng on {model.model_name}: batch {args.batch}, median of {args.rounds} paired rounds "
        f"({machine_line()}, load {os.getloadavg()[0]:.2f})",
        ["dataset", "prompts", "ggsteer pca_center s", "ggsteer mean_diff s", "repeng pca_center s",
         "speed-up pca_center (median)", "range", "speed-up mean_diff (median)", "range",
         f"median |cos| pca_center, layers 1..{n - 2}", "min", f"|cos| layer {n - 1} (last)",
         f"median |cos| mean_diff, layers 1..{n - 2}", f"mean_diff layer {n - 1}"],
        rows,
    )
    print(f"The last layer differs by design: transformers' last hidden state is after the final norm, "
          f"llama.cpp's l_out-{n - 1} is before it. mean_diff: ggsteer's vs the mean of repeng's "
          f"positive-minus-negative hidden states.")
    if args.per_layer:
        print_table("Per-layer |cos| between ggsteer and repeng", ["dataset", "layer", "pca_center", "mean_diff"],
                    layer_rows)
    model.close()


def default_training_table(model, rep, args) -> None:
    """`ggsteer train --preset happy` as it runs by default (rounds that stop when the direction is
    stable, at most DEFAULT_MAX_PAIRS pairs) against repeng's pca_center on every pair of the preset:
    what a user of each gets for one vector, paired and alternated."""
    pairs = preset_dataset("happy")
    results = {}

    def run_ggsteer():
        results["ggsteer"] = train_in_rounds(model, pairs, period=len(get_preset("happy").positive_personas),
                                             batch_size=args.batch)

    def run_repeng():
        results["repeng"] = rep.train(pairs, args.batch)

    ratios, repeng_s, ggsteer_s = paired_times({"default": (run_repeng, run_ggsteer)}, args.rounds)["default"]
    ours = results["ggsteer"]
    r_mean = {il: (h[0::2] - h[1::2]).mean(axis=0) for il, h in rep.hiddens.items()}
    layers = ours.recommended_layers
    cos_mean = [_cos(ours.directions[il], r_mean[il]) for il in layers]
    cos_pca = [_cos(ours.directions[il], results["repeng"].directions[il]) for il in layers]
    print_table(
        f"ggsteer train (default: rounds, {ours.metadata['pairs_used']} pairs) vs repeng pca_center on all "
        f"{len(pairs)} pairs of the happy preset, {model.model_name}: batch {args.batch}, median of {args.rounds} "
        f"paired rounds ({machine_line()}, load {os.getloadavg()[0]:.2f})",
        ["ggsteer s", "repeng s", "speed-up (median)", "range",
         f"median |cos| with repeng's mean difference, layers {layers[0]}-{layers[-1]}", "min",
         "median |cos| with repeng's pca_center"],
        [[f"{np.median(ggsteer_s):.2f}", f"{np.median(repeng_s):.2f}", *ratio_cells([1 / r for r in ratios]),
          f"{np.median(cos_mean):.4f}", f"{min(cos_mean):.4f}", f"{np.median(cos_pca):.4f}"]],
    )


if __name__ == "__main__":
    main()
