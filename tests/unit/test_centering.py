"""EvoSelect's centring modes against a plain numpy reference, and the failure ``unit_mean``
exists for: a few large gradients (a trained proxy's wrong labels) making the pool's mean."""

import numpy as np
import pytest

from evoray.select.evoselect import evoselect
from evoray.select.geometry import UnitRows, centering
from evoray.select.selection import nearest_targets


def _unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _reference(G, V, mode):
    G, V = G.astype(np.float64), V.astype(np.float64)
    if mode == "unit_mean":
        G, V = _unit(G), _unit(V)
    mu = np.zeros(G.shape[1]) if mode == "none" else G.mean(axis=0)
    return _unit(G - mu), _unit(V - mu)


@pytest.mark.parametrize("mode", ["mean", "unit_mean", "none", True, False])
def test_unit_rows_match_the_reference(mode):
    rng = np.random.default_rng(0)
    G = (rng.standard_normal((300, 24)) * rng.uniform(0.1, 20, (300, 1))).astype(np.float16)
    V = rng.standard_normal((7, 24)).astype(np.float32)
    U = UnitRows(G, center=mode)
    Gr, Vr = _reference(G, V, centering(mode))
    np.testing.assert_allclose(U.dense(), Gr, atol=2e-6)
    np.testing.assert_allclose(U.take([5, 3, 299]), Gr[[5, 3, 299]], atol=2e-6)
    np.testing.assert_allclose(U.targets(V), Vr, atol=2e-6)
    rows, cos = nearest_targets(G, V, np.array([0, 10]), n=2, center=mode)
    S = Gr[[0, 10]] @ Vr.T
    np.testing.assert_array_equal(rows, np.argsort(-S, axis=1)[:, :2])
    np.testing.assert_allclose(cos, np.sort(S, axis=1)[:, ::-1][:, :2], atol=2e-6)


def test_unknown_centring_is_refused():
    with pytest.raises(ValueError, match="center must be one of mean, unit_mean, none"):
        UnitRows(np.ones((3, 2), np.float32), center="median")


def test_unit_mean_ignores_each_candidate_norm():
    """What ``unit_mean`` is for: with a trained proxy, wrong labels and off-task candidates
    have gradients about 8 times larger than right labels (weak lookup pool, SmolLM2-135M), and
    under ``"mean"`` those few rows make the centre. Under ``"unit_mean"`` rescaling any
    candidate changes nothing; under ``"mean"`` it moves the centre and the picks."""
    rng = np.random.default_rng(1)
    G = rng.standard_normal((400, 32)).astype(np.float32)
    V = (G[:10] + 0.5 * rng.standard_normal((10, 32))).astype(np.float32)
    scale = np.where(np.arange(400) % 4 == 0, 25.0, 1.0).astype(np.float32)[:, None]
    picks = {(mode, scaled): evoselect(G * scale if scaled else G, V, 40, center=mode).indices
             for mode in ("mean", "unit_mean") for scaled in (False, True)}
    np.testing.assert_array_equal(picks["unit_mean", True], picks["unit_mean", False])
    assert set(picks["mean", True]) != set(picks["mean", False])
    assert evoselect(G, V, 5, center="unit_mean").diagnostics["centered"] == "unit_mean"
