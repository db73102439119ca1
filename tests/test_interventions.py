"""Native interventions (ablate, clamp, add_normalized, gating, conditions, per-sequence) vs numpy."""

import numpy as np
import pytest
from support.oracle import ATOL, PROMPT, last_logits, numpy_op, random_vector, reference_with, unit
from support.reference_model import reference_forward

from ggsteer.runtime.native import native as load_native
from ggsteer.steering.interventions import OPS, Condition
from ggsteer.vectors import ControlVector

native = load_native()

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

# -- kernels ------------------------------------------------------------------------------


def random_rows(n_rows, n, seed):
    rng = np.random.default_rng(seed)
    h = (rng.normal(size=(n_rows, n)) * rng.uniform(1, 3000, size=(n_rows, 1))).astype(np.float32)
    v = rng.normal(size=(n_rows, n)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return h, v


@pytest.mark.parametrize("kind", range(len(OPS)))
@pytest.mark.parametrize("n", [1, 7, 33, 640, 1001])
def test_cpu_kernel_matches_numpy(kind, n):
    h, v = random_rows(5, n, seed=n + kind)
    expected = numpy_op(OPS[kind], h, v, 2.5)
    got = h.copy()
    native.apply_op_cpu(kind, got, v, 2.5)
    # float32 storage of values up to ~1e4: relative 1e-6 of the row norm
    scale = np.linalg.norm(h, axis=1, keepdims=True)
    assert np.abs(got - expected).max() <= 1e-6 * scale.max() + 1e-6


def test_cpu_add_rounds_like_ggml_add():
    # llama.cpp's adapter adds the float32 product strength * v: two roundings, bit for bit
    h, v = random_rows(64, 640, seed=5)
    got = h.copy()
    native.apply_op_cpu(OPS.index("add"), got, v, 0.37)
    np.testing.assert_array_equal(got, h + np.float32(0.37) * v)
    once = (h.astype(np.float64) + np.float32(0.37) * v.astype(np.float64)).astype(np.float32)
    assert (once != got).any()  # a kernel rounding once (double or FMA) would not pass


@pytest.mark.skipif(not native.cuda_device_available(),
                    reason="no CUDA device here: CUDA kernels are compiled but not run")
@pytest.mark.parametrize("kind", range(len(OPS)))
@pytest.mark.parametrize("n", [1, 7, 33, 640, 1001, 4096])
def test_cuda_kernel_matches_cpu(kind, n):
    h, v = random_rows(9, n, seed=n * 3 + kind)
    cpu, gpu = h.copy(), h.copy()
    native.apply_op_cpu(kind, cpu, v, -1.5)
    native.apply_op_cuda(kind, gpu, v, -1.5)
    scale = np.linalg.norm(h, axis=1, keepdims=True).max()
    assert np.abs(cpu - gpu).max() <= 2e-6 * scale + 1e-6


def ran_since(model, before: dict) -> dict:
    """Op applications per backend path since `before` (a Hook.counts() result)."""
    return {path: count - before[path] for path, count in model.hook.counts().items()}


def _cuda_model_unavailable() -> str:
    import llama_cpp

    if not native.CUDA_COMPILED:
        return "ggsteer was built without nvcc: no CUDA kernels"
    if not native.cuda_device_available():
        return "no CUDA device here: the hook's CUDA path is not run"
    if not llama_cpp.llama_supports_gpu_offload():
        return "llama-cpp-python was built without GPU offload"
    return ""


@pytest.fixture(scope="module")
def gpu_tiny_model(tiny_model_path):
    from support.models import TIGHT_LLAMA_KWARGS

    from ggsteer import SteeredModel

    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=128, n_seq_max=16, n_gpu_layers=99, **TIGHT_LLAMA_KWARGS)
    yield model
    model.close()


@pytest.mark.skipif(bool(_cuda_model_unavailable()), reason=_cuda_model_unavailable() or "runs")
@pytest.mark.parametrize("options", [dict(op="ablate"), dict(op="clamp", strength=-2.0),
                                     dict(op="add_normalized", strength=1.3),
                                     dict(op="add", when="prompt"), dict(op="add", first_k=3)])
def test_cuda_hook_matches_cpu_model(tiny_model, gpu_tiny_model, options):
    """The hook on CUDA buffers (CUDA kernels between graph splits) gives the CPU model's logits."""
    vector = random_vector(tiny_model, 41, scale=3.0)
    options = dict(options)
    strength = options.pop("strength", 1.0)
    logits = []
    before = gpu_tiny_model.hook.counts()
    for model in (tiny_model, gpu_tiny_model):
        model.set_control(vector, strength, layers=[1, 2], **options)
        logits.append(last_logits(model))
        model.reset_control()
    counts = ran_since(gpu_tiny_model, before)
    # layers 1 and 2 in one decode, each through the CUDA kernel (not ggml's copy path);
    # first_k=3 leaves layer 2's only row (the last prompt token) alone
    applied = 1 if options.get("first_k") else 2
    assert counts["cuda_kernel"] == applied and counts["copy_path"] == 0 and counts["host_kernel"] == 0
    effect = np.abs(logits[0] - last_logits(gpu_tiny_model)).max()
    # CUDA matmuls round differently from the CPU ones: the gap must be tiny next to the steering effect
    assert np.abs(logits[1] - logits[0]).max() < 0.01 * effect


@pytest.mark.skipif(bool(_cuda_model_unavailable()), reason=_cuda_model_unavailable() or "runs")
def test_cuda_generate_batch_matches_cpu(tiny_model, gpu_tiny_model):
    a, b = random_vector(tiny_model, 17, scale=4.0), random_vector(tiny_model, 18, scale=4.0)
    prompts = ["i am very happy and", "the dog is", "a cat and the sad dog"]
    controls = [[(a, 1.0)], None, [tiny_model.intervention(b, 1.0, op="ablate", layers=[1, 2])]]
    cpu = tiny_model.generate_batch(prompts, controls, max_tokens=8)
    before = gpu_tiny_model.hook.counts()
    gpu = gpu_tiny_model.generate_batch(prompts, controls, max_tokens=8)
    assert gpu == cpu
    counts = ran_since(gpu_tiny_model, before)
    assert counts["cuda_kernel"] > 0 and counts["copy_path"] == 0


def test_cuda_kernels_compiled_when_nvcc_present():
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA kernels are not compiled on this machine")
    assert native.CUDA_COMPILED


# -- ops in the model, against the reference --------------------------------------------


def rows_from(first, positions, edited, original):
    """`edited` on positions >= first, `original` on the rows before (the sink rows left alone)."""
    return np.where((positions >= first)[:, None], edited, original)


@pytest.mark.parametrize("skip_first", [None, 0, 2])
@pytest.mark.parametrize("op, strength", [("ablate", 1.0), ("clamp", 0.7), ("clamp", -2.0), ("add_normalized", 1.3)])
def test_op_matches_reference(tiny_model, tiny_weights, op, strength, skip_first):
    vector = random_vector(tiny_model, 11)
    tiny_model.set_control(vector, strength, layers=[1, 2], op=op, skip_first=skip_first)
    tokens = tiny_model.tokenize_prompt(PROMPT)
    # by default ablate and clamp leave the attention sink (position 0) alone, add_normalized does not
    first = {"ablate": 1, "clamp": 1}.get(op, 0) if skip_first is None else skip_first

    def edit(il, h, positions):
        if il not in (1, 2):
            return h
        v = vector.directions[il].astype(np.float64)
        if op == "add_normalized":
            return rows_from(first, positions, numpy_op(op, h, np.broadcast_to(v, h.shape), strength), h)
        target = strength * np.linalg.norm(v) if op == "clamp" else 0.0
        return rows_from(first, positions, numpy_op("clamp", h, np.broadcast_to(unit(v), h.shape), target), h)

    expected = reference_with(tiny_model, tiny_weights, tokens, edit)[-1]
    before = tiny_model.hook.counts()
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)
    # one decode, layers 1 and 2: the host kernel ran once on each, in place
    assert ran_since(tiny_model, before) == dict(host_kernel=2, cuda_kernel=0, copy_path=0, row_transfers=0)


def test_hook_add_has_the_bits_of_llamas_adapter(tiny_model):
    """Addition in the hook (here forced by first_k) rounds like llama.cpp's control-vector adapter,
    so per-sequence steering in shared decodes gives the very logits of plain steering."""
    vector = random_vector(tiny_model, 13)
    tiny_model.set_control(vector, 0.37, layers=[1, 2])
    adapter = last_logits(tiny_model)
    before = tiny_model.hook.counts()
    tiny_model.set_control(vector, 0.37, layers=[1, 2], first_k=1000)
    hooked = last_logits(tiny_model)
    assert ran_since(tiny_model, before)["host_kernel"] == 2
    assert np.abs(adapter - last_logits_unsteered(tiny_model)).max() > 1e-3  # the steering did something
    np.testing.assert_array_equal(hooked, adapter)


def last_logits_unsteered(model):
    with model.unsteered():
        return last_logits(model)


def test_clamp_zero_equals_ablate(tiny_model):
    vector = random_vector(tiny_model, 12)
    tiny_model.set_control(vector, 0.0, layers=[1, 2], op="clamp")
    clamped = last_logits(tiny_model)
    tiny_model.set_control(vector, 1.0, layers=[1, 2], op="ablate")
    np.testing.assert_allclose(last_logits(tiny_model), clamped, atol=1e-6)


def steered_decode(model, prompt_tokens, generated_tokens):
    """Decode like Llama.generate: the prompt, then generated tokens one at a time."""
    model.reset()
    model._generating = False
    model.eval(prompt_tokens)
    model._generating = True
    for token in generated_tokens:
        model.eval([token])
    model._generating = False
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),)).copy()


@pytest.mark.parametrize(
    "options, applies",
    [
        (dict(when="generated"), lambda pos, n_prompt: pos >= n_prompt),
        (dict(when="prompt"), lambda pos, n_prompt: pos < n_prompt),
        (dict(first_k=3), lambda pos, _n_prompt: pos < 3),
        (dict(when="generated", first_k=9), lambda pos, n_prompt: n_prompt <= pos < 9),
    ],
)
def test_position_gating_matches_reference(tiny_model, tiny_weights, options, applies):
    vector = random_vector(tiny_model, 13, scale=3.0)
    tiny_model.set_control(vector, 1.0, layers=[1, 2], **options)
    prompt = tiny_model.tokenize_prompt(PROMPT)
    generated = tiny_model.tokenize("the happy cat".encode(), add_bos=False)
    got = steered_decode(tiny_model, prompt, generated)

    def edit(il, h, positions):
        if il not in (1, 2):
            return h
        mask = np.array([applies(p, len(prompt)) for p in positions])[:, None]
        return h + mask * vector.directions[il]

    expected = reference_with(tiny_model, tiny_weights, prompt + generated, edit)[-1]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_when_generated_leaves_prompt_untouched(tiny_model):
    prompt = tiny_model.tokenize_prompt(PROMPT)
    plain = steered_decode(tiny_model, prompt, [])
    tiny_model.set_control(random_vector(tiny_model, 14, scale=5.0), 1.0, layers=[1, 2], when="generated")
    np.testing.assert_array_equal(steered_decode(tiny_model, prompt, []), plain)


def first_logits(model, tokens) -> np.ndarray:
    """Logits of the last prompt row, through Llama.generate (which may reuse a cached prefix)."""
    import llama_cpp

    for _ in model.generate(tokens, temp=0.0):
        break
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),)).copy()


@pytest.mark.parametrize("when", ["generated", "prompt"])
def test_generated_tokens_reused_as_prompt_are_recomputed(tiny_model, when):
    """A reply fed back as the next prompt (a chat turn) is prompt there: its states, cached while
    it was generated, must not be reused when steering depends on the phase."""
    vector = random_vector(tiny_model, 53, scale=5.0)
    prompt = tiny_model.tokenize_prompt(PROMPT)
    tiny_model.set_control(vector, 1.0, layers=[1, 2], when=when)
    reply = []
    for token in tiny_model.generate(prompt, temp=0.0):
        reply.append(token)
        if len(reply) == 4:
            break
    follow_up = prompt + reply + tiny_model.tokenize(b" and", add_bos=False)
    reused = first_logits(tiny_model, follow_up)  # Llama.generate matches prompt + reply[:3] here
    tiny_model.set_control(vector, 1.0, layers=[1, 2], when=when)  # drops every cached state
    fresh = first_logits(tiny_model, follow_up)
    np.testing.assert_array_equal(reused, fresh)


def prompt_mean_cosine(model, weights, prompt, layer, direction):
    hidden, _ = reference_forward(weights, model.tokenize_prompt(prompt), kv_f16=False)
    mean = hidden[layer].mean(axis=0)
    return float(mean @ unit(direction) / np.linalg.norm(mean))


def test_condition_switches_steering_per_prompt(tiny_model, tiny_weights):
    cond_vector = random_vector(tiny_model, 15, layers=(0, 1, 2))
    steer = random_vector(tiny_model, 16, scale=3.0)
    prompts = ["i am very happy and the dog", "a sad cat and the bad dog today"]
    cosines = [prompt_mean_cosine(tiny_model, tiny_weights, p, 0, cond_vector.directions[0]) for p in prompts]
    assert abs(cosines[0] - cosines[1]) > 0.02
    threshold = float(np.mean(cosines))
    high = int(np.argmax(cosines))
    # one setting for both prompts: the decision must be remade for each new sequence
    tiny_model.set_control(steer, 1.0, layers=[1, 2], condition=Condition(cond_vector, threshold, 0))
    for index, prompt in enumerate(prompts if high == 0 else prompts[::-1]):
        index = prompts.index(prompt)
        got = last_logits(tiny_model, prompt)
        tokens = tiny_model.tokenize_prompt(prompt)
        active = index == high
        expected = reference_with(
            tiny_model, tiny_weights, tokens,
            lambda il, h, _, active=active: h + steer.directions[il] if active and il in (1, 2) else h,
        )[-1]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_condition_is_remade_when_llama_reuses_a_prefix(tiny_model, tiny_weights):
    """Llama.generate re-evaluates only past the prefix it shares with the last prompt; the
    condition must still be the cosine of the new prompt's own rows (no rows counted twice)."""
    import llama_cpp

    cond_vector = random_vector(tiny_model, 15, layers=(0, 1, 2))
    steer = random_vector(tiny_model, 16, scale=3.0)
    first, second = "a sad cat and the bad dog today", "a sad cat and i am very happy"
    ta, tb = tiny_model.tokenize_prompt(first), tiny_model.tokenize_prompt(second)
    shared = next(i for i, (a, b) in enumerate(zip(ta, tb)) if a != b)
    assert 0 < shared < len(tb) - 1
    direction = unit(cond_vector.directions[0])
    ha = reference_forward(tiny_weights, ta, kv_f16=False)[0][0]
    hb = reference_forward(tiny_weights, tb, kv_f16=False)[0][0]
    cosine = lambda v: float(v @ direction / np.linalg.norm(v))  # noqa: E731
    right, twice = cosine(hb.sum(0)), cosine(ha.sum(0) + hb[shared:].sum(0))
    assert abs(right - twice) > 1e-3
    threshold = (right + twice) / 2
    tiny_model.set_control(steer, 1.0, layers=[1, 2], condition=Condition(cond_vector, threshold, 0))
    tiny_model.create_completion(first, max_tokens=1, temperature=0)
    tiny_model.create_completion(second, max_tokens=1, temperature=0)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(tiny_model.ctx, -1), shape=(tiny_model.n_vocab(),))
    active = right >= threshold
    expected = reference_with(tiny_model, tiny_weights, tb,
                              lambda il, h, _: h + steer.directions[il] if active and il in (1, 2) else h)[-1]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", [dict(op="ablate"), dict(op="clamp", strength=-2.0),
                                     dict(op="add_normalized", strength=1.3),
                                     dict(op="add", first_k=3), dict(op="add", condition="holds")])
def test_copy_path_of_other_backends_gives_the_host_results(tiny_model, tiny_weights, options):
    """Backends whose memory is not host memory (and CUDA without a usable runtime) get their rows
    copied out, changed and copied back; run that path on host tensors and compare."""
    vector = random_vector(tiny_model, 51, scale=3.0)
    options = dict(options)
    if options.get("condition") == "holds":
        cond_vector = random_vector(tiny_model, 52, layers=(0, 1, 2))
        cosine = prompt_mean_cosine(tiny_model, tiny_weights, PROMPT, 0, cond_vector.directions[0])
        cond_vector = cond_vector * float(np.sign(cosine))
        # just under the prompt's cosine: the condition holds only if the rows were read right
        options["condition"] = Condition(cond_vector, abs(cosine) - 1e-3, 0)
    strength = options.pop("strength", 1.0)
    tiny_model.set_control(vector, strength, layers=[1, 2], **options)
    logits, counts = [], []
    for copy_path in (False, True):
        tiny_model.hook.set_host_as_device(copy_path)
        before = tiny_model.hook.counts()
        try:
            logits.append(last_logits(tiny_model))
        finally:
            tiny_model.hook.set_host_as_device(False)
        counts.append(ran_since(tiny_model, before))
    tiny_model.reset_control()
    # the same op applications, each on its own path (first_k=3 leaves layer 2's output row alone)
    applied = 1 if options.get("first_k") else 2
    assert (counts[0]["host_kernel"], counts[0]["copy_path"]) == (applied, 0)
    assert (counts[1]["host_kernel"], counts[1]["copy_path"]) == (0, applied)
    assert np.array_equal(logits[0], logits[1])
    assert np.abs(logits[0] - last_logits(tiny_model)).max() > 100 * ATOL


# -- several sequences, each with its own controls ---------------------------------------


def test_generate_batch_equals_each_sequence_alone(tiny_model):
    a, b = random_vector(tiny_model, 17, scale=4.0), random_vector(tiny_model, 18, scale=4.0)
    prompts = ["i am very happy and", "the dog is", "a cat and the sad dog", "today i feel"]
    controls = [[(a, 1.0)], None, [(b, -1.0)], [(a, 0.5), (b, 0.5)]]
    together = tiny_model.generate_batch(prompts, controls, max_tokens=12)
    for prompt, control, text in zip(prompts, controls, together):
        assert tiny_model.generate_batch([prompt], [control], max_tokens=12) == [text]
    assert len(set(together)) == 4


def test_generate_batch_matches_llama_path(tiny_model):
    vector = random_vector(tiny_model, 19, scale=4.0)
    batch = tiny_model.generate_batch(["i am very happy and", "the dog is"], [[(vector, 1.0)], None], max_tokens=10)
    with tiny_model.steer(vector, 1.0):
        steered = tiny_model.create_completion("i am very happy and", max_tokens=10,
                                               temperature=0)["choices"][0]["text"]
    plain = tiny_model.create_completion("the dog is", max_tokens=10, temperature=0)["choices"][0]["text"]
    assert batch == [steered, plain]


def test_unsteered_sequence_unaffected_by_its_neighbours(tiny_model):
    vector = random_vector(tiny_model, 20, scale=8.0)
    prompts = ["i am very happy and", "the dog is"]
    alone = tiny_model.generate_batch(prompts, [None, None], max_tokens=16)
    mixed = tiny_model.generate_batch(prompts, [[(vector, 1.0)], None], max_tokens=16)
    assert mixed[1] == alone[1]
    assert mixed[0] != alone[0]


def test_generate_batch_conditions_per_sequence(tiny_model, tiny_weights):
    cond_vector = random_vector(tiny_model, 15, layers=(0, 1, 2))
    steer = random_vector(tiny_model, 16, scale=6.0)
    prompts = ["i am very happy and the dog", "a sad cat and the bad dog today"]
    cosines = [prompt_mean_cosine(tiny_model, tiny_weights, p, 0, cond_vector.directions[0]) for p in prompts]
    condition = Condition(cond_vector, float(np.mean(cosines)), 0)
    conditioned = tiny_model.intervention(steer, 1.0, layers=[1, 2], condition=condition)
    always = tiny_model.intervention(steer, 1.0, layers=[1, 2])
    together = tiny_model.generate_batch(prompts, [[conditioned], [conditioned]], max_tokens=10)
    high = int(np.argmax(cosines))
    for i, prompt in enumerate(prompts):
        expected = tiny_model.generate_batch([prompt], [[always] if i == high else None], max_tokens=10)
        assert together[i] == expected[0]
    # the check can tell: steering changes the high prompt's completion
    assert tiny_model.generate_batch([prompts[high]], None, max_tokens=10) != tiny_model.generate_batch(
        [prompts[high]], [[always]], max_tokens=10)


def test_generate_batch_streams_pieces(tiny_model):
    pieces = {0: [], 1: []}
    texts = tiny_model.generate_batch(["the dog is", "a cat"], None, max_tokens=6,
                                      on_token=lambda i, t: pieces[i].append(t))
    assert ["".join(pieces[0]), "".join(pieces[1])] == texts


def test_generate_batch_per_sequence_settings_and_details(tiny_model):
    vector = random_vector(tiny_model, 22, scale=4.0)
    prompts = ["i am very happy and", "the dog is", "a cat"]
    controls = [[(vector, 1.0)], None, None]
    alone = [tiny_model.generate_batch([p], [c], max_tokens=10, details=True)[0] for p, c in zip(prompts, controls)]
    stop_word = alone[1].text[3:6]  # a stop string met inside the second sequence's greedy text
    assert stop_word.strip()
    got = tiny_model.generate_batch(prompts, controls, max_tokens=[4, 10, 10], temperature=[0.0, 0.0, 0.9],
                                    seed=[None, None, 7], stop=[None, [stop_word], None], details=True)
    first = tiny_model.generate_batch([prompts[0]], [controls[0]], max_tokens=4, details=True)[0]
    assert got[0] == first and first.finish_reason == "length" and first.completion_tokens == 4
    assert got[0].prompt_tokens == len(tiny_model.tokenize_prompt(prompts[0]))
    assert got[1].finish_reason == "stop" and got[1].text == alone[1].text[: alone[1].text.find(stop_word)]
    assert got[1].completion_tokens < 10
    # a sampled sequence with its own seed samples the same wherever it sits in the batch
    sampled = tiny_model.generate_batch([prompts[2]], max_tokens=10, temperature=0.9, seed=[7], details=True)[0]
    assert got[2] == sampled and got[2].text != alone[2].text


def test_generate_batch_single_seed_counts_up(tiny_model):
    prompts = ["the dog is", "the dog is"]
    pair = tiny_model.generate_batch(prompts, max_tokens=12, temperature=1.0, seed=3)
    assert pair == [tiny_model.generate_batch([p], max_tokens=12, temperature=1.0, seed=[s])[0]
                    for p, s in zip(prompts, (3, 4))]
    assert pair[0] != pair[1]


# -- bad input ------------------------------------------------------------------------------


def test_bad_intervention_arguments(tiny_model):
    vector = random_vector(tiny_model, 21)
    with pytest.raises(ValueError, match="unknown op 'subtract'"):
        tiny_model.set_control(vector, 1.0, op="subtract")
    with pytest.raises(ValueError, match="unknown when 'later'"):
        tiny_model.set_control(vector, 1.0, when="later")
    with pytest.raises(ValueError, match=r"first_k must be within 1..2147483647, got 0"):
        tiny_model.set_control(vector, 1.0, first_k=0)
    with pytest.raises(ValueError, match="condition layer 1 must come before every steered layer"):
        tiny_model.set_control(vector, 1.0, layers=[1, 2], condition=(vector, 0.1, 1))
    with pytest.raises(ValueError, match=r"condition threshold must be within -1..1, got 1.5"):
        tiny_model.set_control(vector, 1.0, layers=[2], condition=(vector, 1.5, 1))
    with pytest.raises(ValueError, match="2 prompts but 1 controls"):
        tiny_model.generate_batch(["a", "b"], [None])
    with pytest.raises(ValueError, match="2 prompts but 3 values of max_tokens"):
        tiny_model.generate_batch(["a", "b"], max_tokens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"max_tokens must be at least 1, got 0 \(sequence 1\)"):
        tiny_model.generate_batch(["a", "b"], max_tokens=[4, 0])
    with pytest.raises(ValueError, match="sequence 0: temperature must be >= 0"):
        tiny_model.generate_batch(["a"], temperature=-1.0)
    zero = ControlVector({1: np.zeros(48, np.float32)}, "llama", {"unit": "gap"})
    with pytest.raises(ValueError, match="zero vector"):
        tiny_model.set_control(zero, 1.0, layers=[1], op="ablate")


# -- ActAdd and memory vectors ------------------------------------------------------------


def test_actadd_rows_and_injection_match_reference(tiny_model, tiny_weights):
    from ggsteer.train.extract import pad_to_same_length as _pad_to_same_length

    actadd = ControlVector.from_prompts(tiny_model, "i love the dog", "i hate", layer=1)
    love_text, hate_text = _pad_to_same_length(tiny_model, "i love the dog", "i hate")
    assert hate_text.startswith("i hate ") and love_text == "i love the dog"  # the shorter prompt was padded
    love, hate = tiny_model.tokenize_prompt(love_text), tiny_model.tokenize_prompt(hate_text)
    k = len(love)
    assert actadd.rows.shape == (k, tiny_model.n_embd) and len(hate) == k
    hidden_love, _ = reference_forward(tiny_weights, love, kv_f16=False)
    hidden_hate, _ = reference_forward(tiny_weights, hate, kv_f16=False)
    np.testing.assert_allclose(actadd.rows, hidden_love[1] - hidden_hate[1], atol=1e-4)
    np.testing.assert_allclose(actadd.rows[0], 0.0, atol=1e-6)  # BOS: the same token at the same place

    tiny_model.set_control(actadd, 2.0)
    tokens = tiny_model.tokenize_prompt(PROMPT)
    got = last_logits(tiny_model)

    def edit(il, h, positions):
        if il != 1:
            return h
        out = h.copy()
        n = min(k, len(positions))
        out[:n] += 2.0 * actadd.rows[:n]
        return out

    np.testing.assert_allclose(got, reference_with(tiny_model, tiny_weights, tokens, edit)[-1], atol=ATOL, rtol=0)


def test_memory_vector_is_mean_activation(tiny_model, tiny_weights):
    memory = ControlVector.from_phrase(tiny_model, "the happy dog", layer=2)
    hidden, _ = reference_forward(tiny_weights, tiny_model.tokenize_prompt("the happy dog"), kv_f16=False)
    np.testing.assert_allclose(memory.directions[2], hidden[2].mean(axis=0), atol=1e-4)
    assert memory.unit == "raw"
    with pytest.raises(ValueError, match="raw=True"):
        tiny_model.set_control(memory, 0.1, when="generated")
    tiny_model.set_control(memory, 0.1, raw=True, when="generated")


def test_ablate_sets_projection_to_trained_center(tiny_model, tiny_weights):
    base = random_vector(tiny_model, 22)
    centers = {1: 0.8, 2: -1.7}
    vector = ControlVector(base.directions, "llama",
                           {"unit": "gap", "layers": [1, 2], "center": [centers[1], centers[2]]})
    tokens = tiny_model.tokenize_prompt(PROMPT)
    for op, strength, offset in (("ablate", 1.0, 0.0), ("clamp", 0.5, 0.5)):
        tiny_model.set_control(vector, strength, layers=[1, 2], op=op)

        def edit(il, h, positions, offset=offset):
            if il not in (1, 2):
                return h
            v = vector.directions[il].astype(np.float64)
            target = centers[il] + offset * np.linalg.norm(v)
            return rows_from(1, positions, numpy_op("clamp", h, np.broadcast_to(unit(v), h.shape), target), h)

        expected = reference_with(tiny_model, tiny_weights, tokens, edit)[-1]
        np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)
