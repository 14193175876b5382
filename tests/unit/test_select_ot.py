"""The semi-relaxed OT solver against POT, its sparse path, and the LAVA gradient."""

import numpy as np
import ot
import pytest

from evoray.select.ot import SemiRelaxedOT, lava_gradient


def problem(n=300, m=20, d=16, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d))
    V = rng.normal(size=(m, d)) + 0.5
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    return ((1 - V @ G.T) / 2).astype(np.float32)  # (M, N)


def solve(C, eps, tau, idx=None, n=None, **kw):
    n = n or C.shape[1]
    s = SemiRelaxedOT(C, idx, n, eps=eps, tau=tau, tol=1e-10, **kw)
    res = s.solve(np.full(len(C), 1 / len(C)), np.full(n, 1 / n))
    return s, res


@pytest.mark.parametrize("eps,tau", [(0.05, 0.05), (0.01, 0.01), (0.02, 0.005)])
def test_plan_matches_pot_and_marginal_is_exact(eps, tau):
    C = problem()
    m, n = C.shape
    s, res = solve(C, eps, tau)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    P_pot, log = ot.unbalanced.sinkhorn_unbalanced(
        a, b, C.T.astype(np.float64), eps, reg_m=(tau, float("inf")), numItermax=100_000,
        stopThr=1e-14, log=True)
    assert np.abs(P_pot.sum(0) - b).sum() < 1e-9  # POT converged on this case
    assert res.converged and res.marginal_err < 1e-6
    P = s.plan()
    assert np.abs(P.sum(axis=0) - b).sum() < 1e-6
    np.testing.assert_allclose(P, P_pot, atol=1e-9 * P_pot.max(), rtol=1e-6)
    f, g = s.potentials()
    np.testing.assert_allclose(f, eps * log["logu"], atol=1e-8)
    np.testing.assert_allclose(g, eps * log["logv"], atol=1e-8)
    np.testing.assert_allclose(s.mass(), P_pot.sum(axis=1), atol=1e-12)


def test_float32_kernel_still_meets_tolerance():
    C = problem(n=2000, m=50)
    s, res = solve(C, 0.01, 0.01, dtype="float32")
    s.tol = 1e-6
    ref, _ = solve(C, 0.01, 0.01)
    assert res.marginal_err < 1e-5
    np.testing.assert_allclose(s.mass(), ref.mass(), atol=1e-6 * ref.mass().max() * 10)


def test_sparse_with_every_entry_equals_dense():
    C = problem()
    m, n = C.shape
    idx = np.tile(np.arange(n), (m, 1))
    perm = np.random.default_rng(1).permuted(idx, axis=1)  # entries in any order
    dense, _ = solve(C, 0.01, 0.01)
    sparse, res = solve(np.take_along_axis(C, perm, 1), 0.01, 0.01, idx=perm, n=n)
    assert res.converged
    np.testing.assert_allclose(sparse.mass(), dense.mass(), rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(sparse.plan(), dense.plan(), rtol=1e-8, atol=1e-15)


def test_sparse_candidates_outside_every_list_get_nothing():
    C = problem()
    keep = np.argsort(C, axis=1)[:, :30]
    s, res = solve(np.take_along_axis(C, keep, 1), 0.01, 0.01, idx=keep, n=C.shape[1])
    outside = np.setdiff1d(np.arange(C.shape[1]), keep)
    assert res.marginal_err < 1e-6
    assert (s.mass()[outside] == 0).all()
    assert np.isinf(s.potentials()[0][outside]).all()


def test_warm_start_with_excluded_candidates_and_reduced_targets():
    C = problem()
    m, n = C.shape
    s, _ = solve(C, 0.01, 0.01)
    picked = np.argsort(-s.mass())[:20]
    b = np.maximum(np.full(m, 1 / m) - s.carried(picked), 1e-3 / m)
    b /= b.sum()
    a = np.full(n, 1 / (n - 20))
    a[picked] = 0
    res = s.solve(b, a)
    cold = SemiRelaxedOT(C, None, n, eps=0.01, tau=0.01, tol=1e-10)
    cold.solve(b, a)
    assert res.converged and (s.mass()[picked] == 0).all()
    np.testing.assert_allclose(s.mass(), cold.mass(), atol=1e-9)
    assert np.abs(s.plan().sum(axis=0) - b).sum() < 1e-6


def test_carried_is_the_plan_column_sum_over_picks():
    C = problem()
    s, _ = solve(C, 0.01, 0.01)
    picks = np.array([3, 7, 100])
    np.testing.assert_allclose(s.carried(picks), s.plan()[picks].sum(axis=0), rtol=1e-10)


def test_lava_gradient_by_hand():
    C = problem(n=40, m=5)
    s, _ = solve(C, 0.05, 0.05)
    f, _ = s.potentials()
    n = len(f)
    by_hand = np.array([(1 + 1 / (n - 1)) * f[i] - f.sum() / (n - 1) for i in range(n)])
    np.testing.assert_allclose(lava_gradient(f), by_hand, rtol=1e-12, atol=1e-15)
    # with a KL-relaxed candidate side, f_i = -tau·log(r_i / a_i): LAVA ranks like the mass
    np.testing.assert_array_equal(np.argsort(lava_gradient(f)), np.argsort(-s.mass()))


def test_lava_skips_candidates_without_potential():
    f = np.array([0.1, np.inf, 0.3, -0.2])
    out = lava_gradient(f)
    fin = f[[0, 2, 3]]
    assert np.isinf(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], 1.5 * fin - fin.sum() / 2)


def test_parts_split_the_candidates_and_solve_the_same_problem():
    """Three parts holding column blocks of C (what the sharded backend's actors hold) give the
    one-part solver's potentials, masses and carried mass, block after block."""
    from evoray.select.ot import LocalParts, OTPart

    C = problem(n=400, m=25)
    m, n = C.shape
    spans = [(0, 90), (90, 250), (250, n)]
    parts = [OTPart(np.ascontiguousarray(C[:, s:e]), None, e - s, eps=0.01, tau=0.01,
                    dtype="float64") for s, e in spans]
    split = SemiRelaxedOT(None, None, n, eps=0.01, tau=0.01, tol=1e-10, m=m,
                          parts=LocalParts(parts))
    whole = SemiRelaxedOT(C, None, n, eps=0.01, tau=0.01, tol=1e-10)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    for picked in (np.array([3, 100, 260]), np.array([5, 399])):
        whole.solve(b, a)
        for p, (s, e) in zip(parts, spans, strict=True):
            p.a = a[s:e].copy()
        res_split = split.solve(b)
        assert res_split.converged and res_split.marginal_err < 1e-6
        np.testing.assert_allclose(split.mass(), whole.mass(), rtol=1e-7, atol=1e-15)
        np.testing.assert_allclose(split.potentials()[1], whole.potentials()[1], rtol=1e-7)
        carried = b * sum(p.carried(picked[(picked >= s) & (picked < e)] - s)
                          for p, (s, e) in zip(parts, spans, strict=True))
        np.testing.assert_allclose(carried, whole.carried(picked), rtol=1e-7, atol=1e-15)
        a = a.copy()
        a[picked] = 0
        a[a > 0] = 1 / np.count_nonzero(a)
        b = np.maximum(b - carried, 1e-3 / m)
        b /= b.sum()
