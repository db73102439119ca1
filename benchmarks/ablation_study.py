"""Which projection (ablate / clamp) keeps the default model fluent? Issue 16's phase-1 study.

    python benchmarks/ablation_study.py [--presets happy,calm,honest] [--out ablation_study.json]

Variants are prototyped in a Python eval callback chained after ggsteer's native hook, so any
row edit can be tried without touching the kernels. For each preset the vector is trained as
`ControlVector.train` does (default method), and per layer we also measure the residual stream's
shared mean direction m (unit mean of non-sink rows of training prompts). Per variant:

- KL(unsteered || steered) and perplexity on the shipped neutral texts (evaluate's own code);
- a greedy continuation of "I woke up this morning and";
- spread: std of held-out prompts' projections on the trained unit direction u at each ablated
  layer, non-sink rows only, unsteered / steered (target >= 10x; worst layer and median);
- behaviour on prompts that ask for it (the positive persona template before the eval prompt):
  recovery = (persona_unsteered - persona_steered) / (persona_unsteered - neutral_unsteered)
  (target >= 0.5); for clamp at +-1 gap the mean score on the plain eval prompts instead.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import pickle
import re
import sys
import time

import llama_cpp
import numpy as np
from _common import load_models_without_extra_buffers

from ggsteer import SteeredModel
from ggsteer.evaluate import behaviour_scores, generation_sample
from ggsteer.evaluate.fluency import fluency_costs, plan_neutral
from ggsteer.train import get_preset, load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector
from ggsteer.vectors.projection import projection_for_layer

LAYERS = list(range(3, 15))


load_models_without_extra_buffers()
SAMPLE_PROMPT = "I woke up this morning and"
# a row whose norm exceeds this many times the layer's median non-sink norm counts as a sink
OUTLIER_FACTOR = 4.0


class _Tensor(ctypes.Structure):
    # ggml.h's struct ggml_tensor (llama-cpp-python 0.3.36's vendored llama.cpp)
    _fields_ = [
        ("type", ctypes.c_int32),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int32),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class PyHookModel(SteeredModel):
    """SteeredModel whose eval callback runs the native hook, then a Python edit of l_out rows."""

    def _replace_context_with_hooked(self, n_seq_max: int) -> None:
        self._program = None  # {layer: edit(h, positions) -> None (in place)}
        self._records = None  # {layer: list of (positions, rows)} after the edit
        self._positions = None
        native_cb = llama_cpp.ggml_backend_sched_eval_callback(self._hook.callback_address)
        self._native_cb = native_cb

        def callback(t, ask, user_data):
            wanted = native_cb(t, ask, user_data)
            tensor = _Tensor.from_address(t)
            name = tensor.name.decode()
            if not name.startswith("l_out-"):
                return wanted if ask else True
            il = int(name[6:])
            mine = (self._program is not None and il in self._program) or (self._records is not None and il in self._records)
            if ask:
                return bool(wanted or mine)
            if mine:
                self._edit(tensor, il)
            return True

        super()._replace_context_with_hooked(n_seq_max)
        # swap the native callback for the chained one on a fresh context
        self._cb_eval = llama_cpp.ggml_backend_sched_eval_callback(callback)
        params = self.context_params
        params.cb_eval = self._cb_eval
        from llama_cpp import _internals

        old = self._ctx
        self._ctx = self._stack.enter_context(contextlib.closing(_internals.LlamaContext(model=self._model, params=params, verbose=False)))
        old.close()
        self.reset()

    def _edit(self, tensor: _Tensor, il: int) -> None:
        n_embd, n_rows = tensor.ne[0], tensor.ne[1]
        assert tensor.type == 0 and tensor.nb[1] == n_embd * 4, "expected contiguous f32 rows"
        h = np.ctypeslib.as_array((ctypes.c_float * (n_embd * n_rows)).from_address(tensor.data)).reshape(n_rows, n_embd)
        positions = self._positions
        if positions is None or len(positions) != n_rows:
            raise RuntimeError(f"l_out-{il}: {n_rows} rows but {None if positions is None else len(positions)} positions known")
        if self._program is not None and il in self._program:
            h[:] = self._program[il](h.astype(np.float64), positions).astype(np.float32)
        if self._records is not None and il in self._records:
            self._records[il].append((positions.copy(), h.copy()))

    def decode_batch(self, batch, generated=False) -> None:
        self._positions = np.ctypeslib.as_array(batch.pos, shape=(batch.n_tokens,)).astype(np.int64).copy()
        super().decode_batch(batch, generated)

    def eval(self, tokens) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            self._positions = np.arange(self.n_tokens, self.n_tokens + len(chunk))
            super().eval(chunk)

    @contextlib.contextmanager
    def program(self, program):
        previous = self._program
        self._program = program
        self.reset()
        try:
            yield self
        finally:
            self._program = previous
            self.reset()

    @contextlib.contextmanager
    def unsteered(self):
        with super().unsteered(), self.program(None):
            yield self


# -- training-time statistics ---------------------------------------------------------------


def _unit(v):
    return v / np.linalg.norm(v)


def layer_statistics(model: PyHookModel, dataset, vector: ControlVector, n_mean_prompts: int = 64) -> dict:
    """Per layer: u, gap, center (as trained), the shared mean direction m of non-sink rows, the
    median non-sink row norm, and u' = u orthogonalised against m with its own center and gap."""
    prompts = [text for entry in dataset for text in (entry.positive, entry.negative)]
    with model.unsteered():
        last = model.hidden_states(prompts, layers=LAYERS, pool="last")  # [n, L, d]
        step = max(1, len(prompts) // n_mean_prompts)
        every = model.hidden_states(prompts[::step][:n_mean_prompts], layers=LAYERS, pool="all")
    centers = vector.layer_stat("center")
    stats = {}
    for k, il in enumerate(LAYERS):
        rows = np.concatenate([a[1:, k] for a in every]).astype(np.float64)  # position 0 left out
        norms = np.linalg.norm(rows, axis=1)
        m = _unit(rows.mean(axis=0))
        u = _unit(vector.directions[il].astype(np.float64))
        u_orth = _unit(u - (u @ m) * m)
        pos, neg = last[0::2, k].astype(np.float64), last[1::2, k].astype(np.float64)
        mid = (pos + neg) / 2
        bos = np.array([a[0, k] for a in every[:4]], dtype=np.float64)
        stats[il] = dict(
            u=u, gap=float(np.linalg.norm(vector.directions[il])), center=centers[il],
            m=m, cos_um=float(u @ m), median_norm=float(np.median(norms)), bos_norm=float(np.linalg.norm(bos, axis=1).mean()),
            max_nonsink_norm_ratio=float(norms.max() / np.median(norms)),
            u_orth=u_orth, center_orth=float((mid @ u_orth).mean()), gap_orth=float(((pos - neg) @ u_orth).mean()),
            mean_norm=float(np.linalg.norm(np.concatenate([pos, neg]), axis=1).mean()),
        )
    return stats


def add_principal_statistics(model: PyHookModel, dataset, stats: dict, ks=(2, 4, 16), n_prompts: int = 32) -> None:
    """u orthogonalised against the top-k principal directions of the (uncentred) non-sink token
    states, with its center and gap on the training pairs: the shared directions beyond the mean."""
    prompts = [text for entry in dataset for text in (entry.positive, entry.negative)]
    step = max(1, len(prompts) // n_prompts)
    with model.unsteered():
        every = model.hidden_states(prompts[::step][:n_prompts], layers=LAYERS, pool="all")
        last = model.hidden_states(prompts, layers=LAYERS, pool="last")
    for k_layer, il in enumerate(LAYERS):
        rows = np.concatenate([a[1:, k_layer] for a in every]).astype(np.float64)
        _, _, vt = np.linalg.svd(rows, full_matrices=False)
        pos, neg = last[0::2, k_layer].astype(np.float64), last[1::2, k_layer].astype(np.float64)
        for k in ks:
            basis = vt[:k]
            u = stats[il]["u"]
            rest = u - basis.T @ (basis @ u)
            d = rest / np.linalg.norm(rest)
            stats[il][f"u_pc{k}"] = d
            stats[il][f"center_pc{k}"] = float((((pos + neg) / 2) @ d).mean())
            stats[il][f"gap_pc{k}"] = float(((pos - neg) @ d).mean())
            stats[il][f"kept_pc{k}"] = float(np.linalg.norm(rest))


# -- variants ---------------------------------------------------------------------------------


def make_program(stats: dict, variant: str, strength: float) -> dict:
    """Row edits per layer: the projection on the variant's direction set to center + strength*gap.

    Variant names combine: orth (u' against m, the mean direction of the non-sink tokens), pc<k>
    (u against the top-k uncentred principal directions of those tokens), trained (the direction
    and statistics training stores, ggsteer.projection; during the study this was u against the
    mean of the last-token states), skipbos / skipnorm (sink rows left alone), rowscale, keepnorm,
    and _L<a>-<b> (those layers only).
    """
    if "_L" in variant:
        variant, span = variant.split("_L")
        first, last = (int(x) for x in span.split("-"))
        stats = {il: s for il, s in stats.items() if first <= il <= last}
    pc = re.search(r"pc(\d+)", variant)
    if pc:
        key = f"pc{pc.group(1)}"
        stats = {il: dict(s, u_orth=s[f"u_{key}"], center_orth=s[f"center_{key}"], gap_orth=s[f"gap_{key}"]) for il, s in stats.items()}
        variant = variant.replace(pc.group(0), "orth")
    if "trained" in variant:
        stats = {il: dict(s, u_orth=s["u_trained"], center_orth=s["center_trained"], gap_orth=s["gap_trained"]) for il, s in stats.items()}
        variant = variant.replace("trained", "orth")
    orth = "orth" in variant
    sink = "bos" if "skipbos" in variant else ("norm" if "skipnorm" in variant else None)
    rowscale = "rowscale" in variant
    keepnorm = "keepnorm" in variant
    program = {}
    for il, s in stats.items():
        d = s["u_orth"] if orth else s["u"]
        target = (s["center_orth"] + strength * s["gap_orth"]) if orth else (s["center"] + strength * s["gap"])
        program[il] = _edit_function(d, target, sink, s["median_norm"], rowscale, s["mean_norm"], keepnorm)
    return program


def _edit_function(d, target, sink, median_norm, rowscale, mean_norm, keepnorm):
    def edit(h, positions):
        norms = np.linalg.norm(h, axis=1)
        acts = np.ones(len(h), bool)
        if sink == "bos":
            acts &= positions != 0
        elif sink == "norm":
            acts &= norms <= OUTLIER_FACTOR * median_norm
        t = target * (norms / mean_norm) if rowscale else np.full(len(h), target)
        proj = h @ d
        out = h + ((t - proj) * acts)[:, None] * d[None, :]
        if keepnorm:
            new = np.linalg.norm(out, axis=1)
            out *= np.where(acts & (new > 0), norms / np.maximum(new, 1e-30), 1.0)[:, None]
        return out

    return edit


# -- measurements -----------------------------------------------------------------------------


def scores_and_spread(model: PyHookModel, items: list[dict], stats: dict) -> tuple[float, dict[str, dict[int, float]]]:
    """Mean behaviour score of `items`, and the std over their non-sink rows (position > 0, prompts
    and continuations) of the projections on u and on u', per layer, after the edit there."""
    model._records = {il: [] for il in stats}
    try:
        score = float(behaviour_scores(model, items).mean())
        records = model._records
    finally:
        model._records = None
    spread = {"u": {}, "u_orth": {}}
    for key in spread:
        for il, items in records.items():
            proj = np.concatenate([(rows.astype(np.float64) @ stats[il][key])[pos > 0] for pos, rows in items])
            spread[key][il] = float(proj.std())
    return score, spread


def persona_items(preset_name: str, items: list[dict]) -> list[dict]:
    preset = get_preset(preset_name)
    persona = preset.positive_personas[0]
    return [{**item, "prompt": f"{preset.template.format(persona=persona)} {item['prompt']}"} for item in items]


def study_preset(model: PyHookModel, name: str, cases: list[tuple[str, float]], plan, max_suffixes: int | None) -> dict:
    t0 = time.time()
    dataset = preset_dataset(name, max_suffixes=max_suffixes)
    cache = f"/tmp/abl/{name}-{max_suffixes}.pkl"
    try:
        with open(cache, "rb") as f:
            vector, stats = pickle.load(f)
    except FileNotFoundError:
        vector = ControlVector.train(model, dataset)
        stats = layer_statistics(model, dataset, vector)
        with open(cache, "wb") as f:
            pickle.dump((vector, stats), f)
    if any("pc" in variant for variant, _ in cases) and "u_pc2" not in stats[LAYERS[0]]:
        add_principal_statistics(model, dataset, stats)
        with open(cache, "wb") as f:
            pickle.dump((vector, stats), f)
    for il, s in stats.items():
        direction, s["center_trained"] = projection_for_layer(vector, il, "ablate", 0.0)
        s["u_trained"] = direction.astype(np.float64)
        s["gap_trained"] = vector.layer_stat("ablation_gap").get(il, s["gap"])
    print(f"[{name}] trained + stats in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    items = load_eval_prompts(name)
    asking = persona_items(name, items)
    with model.unsteered():
        neutral = float(behaviour_scores(model, items).mean())
        persona, base = scores_and_spread(model, asking, stats)
        base_sample = generation_sample(model, SAMPLE_PROMPT)
    labels = list(cases)
    settings = [lambda p=make_program(stats, variant, strength): model.program(p) for variant, strength in labels]
    costs, plain = fluency_costs(model, plan, settings)
    for label, cost in zip(labels, costs):
        print(f"[{name}] {label}: KL {cost.kl:.3f}, perplexity {cost.perplexity:.1f} (unsteered {plain.perplexity:.1f})", file=sys.stderr, flush=True)
    rows = []
    for (variant, strength), setting, cost in zip(labels, settings, costs):
        with setting():
            b_persona, spread = scores_and_spread(model, asking, stats)
            sample = generation_sample(model, SAMPLE_PROMPT)
        shrink = np.array([base["u"][il] / max(spread["u"][il], 1e-12) for il in LAYERS])
        shrink_orth = np.array([base["u_orth"][il] / max(spread["u_orth"][il], 1e-12) for il in LAYERS])
        row = dict(
            preset=name, variant=variant, strength=strength, kl=cost.kl, ppl=cost.perplexity, ppl_ratio=cost.perplexity / plain.perplexity,
            shrink_min=float(shrink.min()), shrink_median=float(np.median(shrink)),
            shrink_orth_min=float(shrink_orth.min()), shrink_orth_median=float(np.median(shrink_orth)),
            behaviour_persona=b_persona,
            recovery=(persona - b_persona) / (persona - neutral) if persona != neutral else float("nan"),
            sample=sample,
        )
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    layer_info = {il: {k: v for k, v in s.items() if not isinstance(v, np.ndarray)} for il, s in stats.items()}
    print(f"[{name}] done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return dict(preset=name, unsteered=dict(behaviour_neutral=neutral, behaviour_persona=persona, perplexity=plain.perplexity,
                                            sample=base_sample), layers=layer_info, rows=rows)


ABLATE_VARIANTS = ["all", "skipbos", "skipnorm", "orth", "orth_skipbos", "rowscale", "orth_skipbos_keepnorm"]
CLAMP_VARIANTS = ["all", "skipbos", "orth_skipbos"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="happy,calm,honest")
    parser.add_argument("--variants", default=",".join(ABLATE_VARIANTS), help="at strength 0 (ablate)")
    parser.add_argument("--clamp-variants", default=",".join(CLAMP_VARIANTS), help="at +-1 gap")
    parser.add_argument("--neutral", type=int, default=None, help="use only the first N neutral texts")
    parser.add_argument("--max-suffixes", type=int, default=None, help="train on the first N suffixes only")
    parser.add_argument("--out", default="ablation_study.json")
    args = parser.parse_args()
    # one thread each: on an oversubscribed machine ggml's spinning barriers waste the cores
    model = PyHookModel(n_ctx=8192, n_batch=512, n_seq_max=64, n_threads=1, n_threads_batch=1)
    from ggsteer.evaluate import load_neutral_texts

    texts = load_neutral_texts()[: args.neutral]
    plan = plan_neutral(model, texts)
    results = []
    for name in args.presets.split(","):
        cases = [(v, 0.0) for v in args.variants.split(",") if v]
        cases += [(v, s) for v in args.clamp_variants.split(",") if v for s in (1.0, -1.0)]
        results.append(study_preset(model, name, cases, plan, args.max_suffixes))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
