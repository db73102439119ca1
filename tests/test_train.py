"""Training: each method against an independent numpy computation on the reference states."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from support.oracle import SUFFIXES, reference_pair_states

from ggsteer import ControlVector, TrainingWarning
from ggsteer.train import DatasetEntry, make_dataset, methods


@pytest.fixture(scope="module")
def pairs():
    return make_dataset("i am very {persona} and", ["happy", "good", "happy"], ["sad", "bad", "sad"], SUFFIXES)


def numpy_direction(method, pos, neg):
    """Each method written independently of ggsteer.methods (full SVD of the data as repeng builds
    it, instead of ggsteer's Gram eigendecomposition; sklearn probe)."""
    diffs = pos - neg
    if method == "mean_diff":
        d = diffs.mean(axis=0)
    elif method == "pca_diff":
        d = np.linalg.svd(diffs - diffs.mean(axis=0), full_matrices=False)[2][0]
    elif method == "pca_center":
        center = (pos + neg) / 2
        d = np.linalg.svd(np.concatenate([pos - center, neg - center]), full_matrices=False)[2][0]
    else:
        x = np.concatenate([pos, neg])
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        d = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(x / np.linalg.norm(x, axis=1).mean(), y).coef_[0]
    d = d / np.linalg.norm(d)
    # sign: most pairs project higher on the positive side; a tie goes to the mean gap
    votes = np.sign(diffs @ d).sum()
    return -d if votes < 0 or (votes == 0 and (diffs @ d).mean() < 0) else d


@pytest.mark.parametrize("pool", ["suffix", "last"])
@pytest.mark.parametrize("method", methods.METHODS)
def test_method_matches_numpy_on_reference_states(tiny_model, tiny_weights, pairs, method, pool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        vector = ControlVector.train(tiny_model, pairs, method=method, pool=pool)
    assert vector.layers == [1, 2]
    assert vector.metadata["pool"] == pool
    pos, neg = reference_pair_states(tiny_model, tiny_weights, pairs, pool)
    gaps = vector.layer_stat("gap")
    for il in vector.layers:
        expected = numpy_direction(method, pos[:, il], neg[:, il])
        got = vector.directions[il] / np.linalg.norm(vector.directions[il])
        assert float(got @ expected) >= 0.999, f"layer {il}: cos {float(got @ expected):.5f}"
        # stored length is the mean gap along the direction: the strength unit
        expected_gap = abs(float(((pos[:, il] - neg[:, il]) @ expected).mean()))
        assert gaps[il] == pytest.approx(expected_gap, rel=1e-3)
        assert np.linalg.norm(vector.directions[il]) == pytest.approx(gaps[il], rel=1e-5)


def test_mean_diff_is_the_raw_mean_difference(tiny_model, tiny_weights, pairs):
    vector = ControlVector.train(tiny_model, pairs, method="mean_diff")  # the default pool: "suffix"
    pos, neg = reference_pair_states(tiny_model, tiny_weights, pairs)
    for il in vector.layers:
        np.testing.assert_allclose(vector.directions[il], (pos[:, il] - neg[:, il]).mean(axis=0), atol=2e-4)
    assert vector.metadata["pool"] == "suffix"


def test_suffix_pool_reads_the_shared_ending(tiny_model, tiny_weights):
    """Pairs that end alike pool their shared tokens; a pair sharing no ending reads its last token."""
    from ggsteer.train.extract import pair_pools

    pairs = [DatasetEntry("i am very happy and the dog is", "i am very sad and the dog is"),
             DatasetEntry("i feel good", "the sad cat"),
             DatasetEntry("today i love the dog", "the dog")]
    prompts = [text for entry in pairs for text in (entry.positive, entry.negative)]
    tail = len(tiny_model.tokenize_prompt("i am very happy and the dog is")) - 5  # after "<bos> i am very happy"
    assert pair_pools(tiny_model, prompts, "suffix") == [tail, tail, 1, 1, 2, 2]
    vector = ControlVector.train(tiny_model, pairs, method="mean_diff", layers=[1, 2], pool="suffix")
    pos, neg = reference_pair_states(tiny_model, tiny_weights, pairs)
    for il in (1, 2):
        np.testing.assert_allclose(vector.directions[il], (pos[:, il] - neg[:, il]).mean(axis=0), atol=2e-4)
    assert pair_pools(tiny_model, prompts[:2], "suffix") == [tail, tail]  # one pair: no shared opening to drop


def test_suffix_pool_drops_the_opening_every_pair_shares(tiny_model, pairs):
    """The persona template's " and" ends every pair in common before the suffix: it is not pooled."""
    from ggsteer.train.extract import pair_pools

    prompts = [text for entry in pairs for text in (entry.positive, entry.negative)]
    per_suffix = [len(tiny_model.tokenize_prompt(suffix)) - 1 for suffix in SUFFIXES]  # without <bos>
    assert pair_pools(tiny_model, prompts, "suffix") == [n for n in per_suffix for _ in range(3) for _ in range(2)]


def test_statistics_recorded(tiny_model, tiny_weights, pairs):
    vector = ControlVector.train(tiny_model, pairs, method="mean_diff", layers=[0, 1, 2], pool="suffix")
    pos, neg = reference_pair_states(tiny_model, tiny_weights, pairs)
    separation = vector.layer_stat("separation")
    norms = vector.layer_stat("residual_norm")
    for il in (0, 1, 2):
        d = vector.directions[il] / np.linalg.norm(vector.directions[il])
        assert separation[il] == pytest.approx(float((((pos[:, il] - neg[:, il]) @ d) > 0).mean()))
        both = np.concatenate([pos[:, il], neg[:, il]])
        assert norms[il] == pytest.approx(float(np.linalg.norm(both, axis=1).mean()), rel=1e-4)
        midpoints = (pos[:, il] + neg[:, il]) / 2
        assert vector.layer_stat("center")[il] == pytest.approx(float((midpoints @ d).mean()), rel=1e-4, abs=1e-4)
    assert vector.metadata["dataset_size"] == len(pairs)
    assert vector.metadata["method"] == "mean_diff"


@pytest.mark.parametrize("method", methods.METHODS)
def test_sign_points_to_positive_on_known_direction(method):
    rng = np.random.default_rng(3)
    truth = rng.normal(size=32)
    truth /= np.linalg.norm(truth)
    base = rng.normal(size=(40, 32)) * 3.0
    # pairs differ along `truth` by a varying positive amount, plus small noise
    shift = rng.uniform(0.5, 2.0, size=(40, 1)) * truth
    pos = base + shift + rng.normal(size=base.shape) * 0.05
    neg = base - shift + rng.normal(size=base.shape) * 0.05
    fit = methods.fit_layer(pos, neg, method)
    assert float(fit.direction @ truth) > 0.95
    assert fit.separation == 1.0
    assert fit.gap > 0
    flipped = methods.fit_layer(neg, pos, method)
    assert float(flipped.direction @ truth) < -0.95


@pytest.mark.parametrize("n_pairs", [12, 80])  # fewer and more pairs than dimensions
@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_matches_full_svd(method, n_pairs):
    """The Gram-matrix route gives the SVD's first component, oriented toward the positive side."""
    rng = np.random.default_rng(n_pairs)
    # anisotropic data so the first component is well separated from the second
    pos = rng.normal(size=(n_pairs, 40)) * np.linspace(4.0, 0.5, 40) + 1.0
    neg = rng.normal(size=(n_pairs, 40)) * np.linspace(4.0, 0.5, 40)
    expected = numpy_direction(method, pos, neg)
    got = methods.fit_layer(pos, neg, method).direction.astype(np.float64)
    assert float(got @ expected) > 1 - 1e-6
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
def test_pca_of_identical_sides_is_refused(shape):
    same = np.ones(shape)
    for method in ("pca_diff", "pca_center", "mean_diff"):
        with pytest.raises(ValueError, match="coincide"):
            methods.fit_layer(same, same, method)


def test_training_is_deterministic(tiny_model, pairs):
    a = ControlVector.train(tiny_model, pairs, method="pca_diff")
    b = ControlVector.train(tiny_model, pairs, method="pca_diff")
    for il in a.layers:
        np.testing.assert_array_equal(a.directions[il], b.directions[il])


def test_near_chance_layer_warns(tiny_model):
    # positives and negatives drawn from the same texts: no direction separates them
    texts = ["the dog", "a cat", "i feel good", "the sad cat", "you am happy", "today i hate", "the bad dog",
             "a good cat"]
    shuffled = [DatasetEntry(texts[i], texts[(i + 3) % len(texts)]) for i in range(len(texts))]
    with pytest.warns(TrainingWarning, match="barely better than chance"):
        ControlVector.train(tiny_model, shuffled, method="pca_diff")


def test_bad_training_input(tiny_model, pairs):
    with pytest.raises(ValueError, match="dataset is empty"):
        ControlVector.train(tiny_model, [])
    with pytest.raises(ValueError, match="unknown method 'umap'"):
        ControlVector.train(tiny_model, pairs, method="umap")
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        ControlVector.train(tiny_model, pairs, layers=[1, 7])
    with pytest.raises(ValueError, match="pool must be one of suffix, last, mean for training, got 'all'"):
        ControlVector.train(tiny_model, pairs, pool="all")
    with pytest.raises(TypeError, match="not DatasetEntry"):
        ControlVector.train(tiny_model, [("a", "b")])
