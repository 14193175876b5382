"""EvoSelect's target smoothing (``target_knn``, ``target_mix``) against a plain numpy
reference: the smoothed directions, the cost they give, and the cases where it must change
nothing."""

import numpy as np
import pytest

from evoray.select.evoselect import evoselect, smooth_targets
from evoray.select.geometry import UnitRows
from evoray.select.ot import SemiRelaxedOT


def _unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _data(seed=0, n=300, m=12, d=16):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, d)).astype(np.float32)
    V = (G[:m] + 0.7 * rng.standard_normal((m, d))).astype(np.float32)
    return G, V


def test_smoothed_directions_match_the_reference():
    _, V = _data()
    Vh = _unit(V.astype(np.float64)).astype(np.float32)
    for knn, mix in ((1, 0.75), (4, 0.75), (4, 0.3), (12, 1.0), (50, 0.5)):
        S = Vh.astype(np.float64) @ Vh.T
        ref = np.empty_like(Vh, dtype=np.float64)
        for j in range(len(Vh)):
            near = np.argsort(-S[j], kind="stable")[:min(knn, len(Vh))]
            mean = Vh[near].astype(np.float64).mean(axis=0)
            ref[j] = mix * mean / np.linalg.norm(mean) + (1 - mix) * Vh[j]
        np.testing.assert_allclose(smooth_targets(Vh, knn, mix), ref, atol=1e-6)
    # knn = 1: a target's nearest target is itself, so nothing moves
    np.testing.assert_allclose(smooth_targets(Vh, 1, 0.75), Vh, atol=1e-6)


def test_alignment_is_the_ot_mass_of_the_mixed_cost():
    """The first OT solve runs on ``mix * cost(smoothed) + (1 - mix) * cost(own)``."""
    G, V = _data(1)
    U = UnitRows(G, center="unit_mean")
    Gh, Vh = U.dense().astype(np.float64), U.targets(V).astype(np.float64)
    S = Vh @ Vh.T
    near = np.argsort(-S, axis=1, kind="stable")[:, :5]
    Sm = _unit(Vh[near].mean(axis=1))
    C = (0.6 * (1 - Sm @ Gh.T) / 2 + 0.4 * (1 - Vh @ Gh.T) / 2).astype(np.float32)
    solver = SemiRelaxedOT(C, None, len(G), eps=0.01, tau=0.01, tol=1e-6, max_iter=5000)
    solver.solve(np.full(len(V), 1 / len(V)), np.full(len(G), 1 / len(G)))
    mass = solver.mass()
    mass = np.where(mass * len(G) < 0.01, -np.inf, mass)
    sel = evoselect(G, V, 30, target_knn=5, target_mix=0.6, center="unit_mean")
    np.testing.assert_allclose(sel.scores["alignment"], mass, rtol=1e-4, atol=1e-9)
    assert sel.diagnostics["target_knn"] == 5


def test_smoothing_off_changes_nothing():
    G, V = _data(2)
    off = evoselect(G, V, 30, target_knn=0).indices
    np.testing.assert_array_equal(evoselect(G, V, 30, target_knn=8, target_mix=0.0).indices, off)
    np.testing.assert_array_equal(evoselect(G, V, 30, target_knn=1).indices, off)
    assert set(evoselect(G, V, 30, target_knn=8, target_mix=1.0).indices) != set(off)


def test_smoothing_follows_what_the_targets_share():
    """The failure it exists for: each target holds the task's shared direction plus one of a
    few private ones (its answer letter), and candidates that hold only a private direction
    (a wrong label under a trained proxy points away from the task) match single targets.
    Without smoothing the alignment picks some of them; with it, the shared direction wins."""
    rng = np.random.default_rng(3)
    d = 32
    task, private = np.eye(d)[0], np.eye(d)[1:5]
    V = np.stack([task + 1.2 * private[j % 4] + 0.1 * rng.standard_normal(d)
                  for j in range(20)]).astype(np.float32)
    good = task + 0.6 * private[rng.integers(0, 4, 100)] + 0.3 * rng.standard_normal((100, d))
    bad = -0.2 * task + 1.2 * private[rng.integers(0, 4, 100)] + 0.3 * rng.standard_normal(
        (100, d))
    G = np.concatenate([good, bad]).astype(np.float32)
    plain = evoselect(G, V, 40, target_knn=0, lam=0.0).indices
    smooth = evoselect(G, V, 40, target_knn=20, target_mix=0.75, lam=0.0).indices
    assert (smooth >= 100).sum() < (plain >= 100).sum()
    assert (smooth >= 100).sum() == 0


def test_bad_settings_are_refused():
    G, V = _data()
    with pytest.raises(ValueError, match="target_knn must be >= 0 and target_mix in"):
        evoselect(G, V, 5, target_knn=-1)
    with pytest.raises(ValueError, match="target_mix in"):
        evoselect(G, V, 5, target_mix=1.5)
