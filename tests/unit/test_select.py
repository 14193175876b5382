"""Selectors on planted structure (Gaussian mixtures), each against a simple reference."""

import heapq
import logging

import numpy as np
import pytest

from evoray.errors import SelectError
from evoray.select import DRAWS, METHODS, attribution_scores, budget, select, tsds_probabilities
from evoray.select.evoselect import Greedy
from evoray.select.geometry import unit

N_ALIGNED = 200


def planted(seed=0, d=64, spread=0.6):
    """M = 50 targets; 200 candidates around them (50 of those near-copies of another aligned
    candidate, noise 1e-3) and 1,800 from 5 other components. Rows 0..199 are the aligned ones;
    ``copies[t]`` (row 150 + t) copies aligned row ``src[t]``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def around(c, n):
        return c + spread * rng.normal(size=(n, d)) / np.sqrt(d)

    V = around(centres[0], 50)
    aligned = around(centres[0], 150)
    src = rng.choice(150, 50, replace=False)
    copies = aligned[src] + 1e-3 * rng.normal(size=(50, d))
    others = np.concatenate([around(centres[1 + c], 360) for c in range(5)])
    G = np.concatenate([aligned, copies, others]).astype(np.float32)
    return G, V.astype(np.float32), src


@pytest.fixture(scope="module")
def data():
    return planted()


def centred_cos(G, picks):
    X = unit(G, G.mean(axis=0))[picks]
    S = X @ X.T
    np.fill_diagonal(S, -1)
    return S


# ---- every method -------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic_for_a_seed_and_well_formed(method, data):
    G, V, _ = data
    a = select(G, V, 100, method=method, seed=3)
    b = select(G, V, 100, method=method, seed=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.explain["count"].sum() == 100
    assert len(np.unique(a.indices)) == len(a.indices)
    assert ((0 <= a.indices) & (a.indices < len(G))).all()
    assert a.explain["nearest_targets"].shape == (len(a), 3)
    assert (np.diff(a.explain["nearest_cos"], axis=1) <= 1e-6).all()
    for col in a.scores.values():
        assert len(col) == len(G)


def test_random_seed_changes_the_sample(data):
    G, V, _ = data
    assert set(select(G, V, 50, method="random", seed=0).indices) != \
        set(select(G, V, 50, method="random", seed=1).indices)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_content_keys_make_every_method_order_free(method, data):
    """Shuffled rows with their keys pick the same candidates (mapped back, in the same rank
    order, with the same per-candidate scores); without keys a seeded draw is another draw."""
    G, V, _ = data
    keys = np.random.default_rng(5).integers(0, 2**63, len(G)).astype(np.uint64)
    perm = np.random.default_rng(6).permutation(len(G))
    a = select(G, V, 100, method=method, seed=3, keys=keys)
    b = select(G[perm], V, 100, method=method, seed=3, keys=keys[perm])
    np.testing.assert_array_equal(perm[b.indices], a.indices)
    for name, col in a.scores.items():
        np.testing.assert_allclose(b.scores[name], col[perm], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    plain = select(G[perm], V, 100, method=method, seed=3)
    same = set(perm[plain.indices]) == set(a.indices)
    assert same == (method not in DRAWS)  # the keys are what make the draws order-free
    with pytest.raises(SelectError, match="one entry per candidate row"):
        select(G, V, 10, method=method, keys=keys[:5])


def test_nearest_targets_are_the_most_similar(data):
    G, V, _ = data
    sel = select(G, V, 10, method="attribution")
    S = unit(G[sel.indices]) @ unit(V).T
    np.testing.assert_array_equal(sel.explain["nearest_targets"], np.argsort(-S, axis=1)[:, :3])


# ---- attribution ----------------------------------------------------------------------------

def test_attribution_is_top_k_of_the_less_score(data):
    G, V, _ = data
    g = G / np.linalg.norm(G, axis=1, keepdims=True)
    v = V / np.linalg.norm(V, axis=1, keepdims=True)
    score = g.astype(np.float64) @ v.astype(np.float64).mean(axis=0)
    sel = select(G, V, 150, method="attribution")
    np.testing.assert_array_equal(sel.indices, np.argsort(-score, kind="stable")[:150])
    assert (sel.indices < N_ALIGNED).all()


def test_attribution_with_subtasks_takes_the_max_over_subtask_means(data):
    G, V, _ = data
    labels = np.array(["a", "b"] * 25)
    g = G / np.linalg.norm(G, axis=1, keepdims=True)
    v = V / np.linalg.norm(V, axis=1, keepdims=True)
    score = np.maximum(g @ v[labels == "a"].mean(0), g @ v[labels == "b"].mean(0))
    np.testing.assert_allclose(attribution_scores(G, V, labels), score, rtol=1e-5, atol=1e-6)
    sel = select(G, V, 20, method="attribution", subtasks=labels)
    np.testing.assert_array_equal(sel.indices, np.argsort(-score, kind="stable")[:20])


# ---- diversity ------------------------------------------------------------------------------

@pytest.mark.parametrize("two_level_above", [4096, 0])
def test_diversity_fills_from_the_smallest_clusters(data, two_level_above):
    G, V, _ = data
    sel = select(G, V, 60, method="diversity", two_level_above=two_level_above)
    size, label = sel.scores["cluster_size"], sel.scores["cluster"]
    assert sel.diagnostics["clusters"] == 200 and len(np.unique(label)) <= 200
    key = list(zip(size[sel.indices], label[sel.indices], strict=True))
    assert key == sorted(key)  # (size, cluster id) never decreases along the ranking
    last = key[-1]
    for c in np.unique(label):  # every cluster ordered before the last one is complete
        if (size[label == c][0], c) < last:
            assert np.isin(np.flatnonzero(label == c), sel.indices).all()
    cos = sel.scores["centroid_cos"][sel.indices]
    for c in np.unique(label[sel.indices]):
        inside = cos[label[sel.indices] == c]
        assert (np.diff(inside) <= 0).all()  # nearest-to-centroid first


@pytest.mark.parametrize("two_level_above", [4096, 0])
def test_kmeans_one_and_two_level_find_separated_groups(two_level_above):
    """60 well-separated groups of 1 to 12 rows, 60 clusters: most groups come out as one
    cluster each way (k-means' local optima split a few and merge others: 48-51 of 60 for
    both paths over 4 seeds), and every cluster label is used."""
    rng = np.random.default_rng(3)
    centres = unit(rng.normal(size=(60, 32)))
    sizes = 1 + np.arange(60) % 12
    G = np.repeat(centres, sizes, axis=0) + 1e-3 * rng.normal(size=(sizes.sum(), 32))
    sel = select(G, G[:5], 40, method="diversity", cluster_ratio=60 / len(G),
                 two_level_above=two_level_above)
    lab, group = sel.scores["cluster"], np.repeat(np.arange(60), sizes)
    assert sorted(np.unique(lab).tolist()) == list(range(60))
    assert sum(len(np.unique(lab[group == g])) == 1 for g in range(60)) >= 45


def test_attr_div_only_picks_from_the_top_three_quarters(data):
    G, V, _ = data
    sel = select(G, V, 100, method="attr_div")
    score = attribution_scores(G, V)
    assert (score[sel.indices] >= np.quantile(score, 0.25) - 1e-6).all()
    with pytest.raises(SelectError, match="keeps 1500"):
        select(G, V, 1600, method="attr_div")


# ---- TSDS -----------------------------------------------------------------------------------

def authors_loop(top_dists, top_indices, top_kdes, n, alpha=0.5, C=5.0):
    """ZifanL/TSDS tsds.py, the probability assignment, transcribed line by line."""
    M = top_indices.shape[0]
    MAX_K = top_indices.shape[1]
    lastK = [0] * M
    heap = [(1.0 / top_kdes[j][0], 0, j) for j in range(M)]
    heapq.heapify(heap)
    dist_weighted_sum = [top_dists[j][0] / top_kdes[j][0] for j in range(M)]
    s = 0
    cost = np.zeros(M)
    total_cost = 0
    while len(heap) > 0:
        count, curr_k, curr_j = heapq.heappop(heap)
        s = count
        total_cost -= cost[curr_j]
        cost[curr_j] = top_dists[curr_j][curr_k + 1] * count - dist_weighted_sum[curr_j]
        total_cost += cost[curr_j]
        if alpha / C * total_cost >= (1 - alpha) * M:
            break
        lastK[curr_j] = curr_k
        if curr_k < MAX_K - 2:
            count += 1.0 / top_kdes[curr_j][curr_k + 1]
            heapq.heappush(heap, (count, curr_k + 1, curr_j))
            dist_weighted_sum[curr_j] += (top_dists[curr_j][curr_k + 1]
                                          / top_kdes[curr_j][curr_k + 1])
    global_probs = np.zeros(n)
    for j in range(M):
        prob_sum = 0
        for k in range(lastK[j] + 1):
            global_probs[top_indices[j][k]] += 1 / M / s / top_kdes[j][k]
            prob_sum += 1 / M / s / top_kdes[j][k]
        global_probs[top_indices[j][lastK[j] + 1]] += max(1.0 / M - prob_sum, 0)
    return global_probs


@pytest.mark.parametrize("alpha,C,sigma", [(0.5, 5.0, 0.75), (0.9, 1.0, 0.75), (0.5, 5.0, 1.2),
                                           (0.2, 0.05, 0.75)])
def test_tsds_matches_the_authors_loop(alpha, C, sigma):
    G, V, _ = planted(seed=1)
    G, V = G[::4], V[:20]  # 500 candidates: K = 50 neighbours per target
    n = len(G)
    g, v = unit(G).astype(np.float64), unit(V).astype(np.float64)
    D = np.sqrt(np.maximum(((v[:, None] - g[None]) ** 2).sum(-1), 0))
    K = n // 10
    top_indices = np.argsort(D, axis=1, kind="stable")[:, :K]
    top_dists = np.take_along_axis(D, top_indices, 1)
    top = np.unique(top_indices)
    D2 = ((g[top][:, None] - g[top][None]) ** 2).sum(-1)
    D2 = np.sort(D2, axis=1)[:, :min(K, len(top))]
    kern = 1 - D2 / sigma ** 2
    kde = np.zeros(n)
    kde[top] = (kern * (kern > 0)).sum(axis=1)
    top_kdes = kde[top_indices]
    expected = authors_loop(top_dists, top_indices, top_kdes, n, alpha, C)
    expected /= expected.sum()
    np.testing.assert_allclose(tsds_probabilities(top_dists, top_indices, top_kdes, n,
                                                  alpha=alpha, C=C), expected, atol=1e-12)
    sel = select(G, V, 40, method="tsds", seed=7, alpha=alpha, C=C, sigma=sigma)
    np.testing.assert_allclose(sel.scores["probability"], expected, atol=1e-5)
    counts = np.random.default_rng(7).multinomial(40, sel.scores["probability"])
    assert dict(zip(sel.indices.tolist(), sel.explain["count"].tolist(), strict=True)) == \
        {i: int(c) for i, c in enumerate(counts) if c}


def test_tsds_ivf_probes_more_lists_where_the_probed_ones_fall_short():
    """1,800 rows in one tight blob take one IVF list; a target among the 200 spread rows probes
    10 small lists holding fewer than its K = 200 neighbours: nprobe is doubled for it (this
    raised before) and the probabilities' support is the exact path's."""
    rng = np.random.default_rng(0)
    blob = np.zeros(16)
    blob[0] = 10
    G = np.vstack([blob + rng.normal(size=(1800, 16)) * 0.001,
                   rng.normal(size=(200, 16))]).astype(np.float32)
    V = rng.normal(size=(20, 16)).astype(np.float32)
    ivf = select(G, V, 50, method="tsds", exact_max=0)
    exact = select(G, V, 50, method="tsds")
    assert not ivf.diagnostics["exact_knn"] and exact.diagnostics["exact_knn"]
    a, b = ivf.scores["probability"] > 0, exact.scores["probability"] > 0
    assert (a & b).sum() / (a | b).sum() >= 0.95


def test_tsds_kde_down_weights_near_copies(data):
    G, V, src = data
    sel = select(G, V, 200, method="tsds")
    kde = sel.scores["kde"]
    assert np.nanmin(kde) >= 1.0
    copied = np.concatenate([src, np.arange(150, 200)])
    assert np.nanmedian(kde[copied]) >= 1.9  # a copy pair counts each other


def test_tsds_without_replacement(data):
    G, V, _ = data
    sel = select(G, V, 30, method="tsds", replace=False, seed=2)
    assert len(np.unique(sel.indices)) == 30
    with pytest.raises(SelectError, match="nonzero TSDS probability"):
        select(G, V, 1900, method="tsds", replace=False)


# ---- EvoSelect ------------------------------------------------------------------------------

def reference_greedy(aligns, X, lam, count, redundant_cos=0.98, bins=65536):
    """Brute force: recount both ranks among the remaining candidates before every pick;
    ``count`` picks for each alignment array of ``aligns`` in turn, the state carried over."""
    n = len(aligns[0])
    alive = np.ones(n, bool)
    nov = np.ones(n, np.float32)
    picks = []
    for align, _ in ((a, t) for a in aligns for t in range(count)):
        idx = np.flatnonzero(alive)
        a = align[idx]
        qb = np.minimum((np.clip(nov[idx], 0, 2) * (bins / 2)).astype(np.int64), bins - 1)
        ra = (a[None, :] < a[:, None]).sum(axis=1)
        rn = (qb[None, :] < qb[:, None]).sum(axis=1)
        score = (1 - lam) * ra + lam * rn - 2 * n * (nov[idx] < 1 - redundant_cos)
        i = idx[np.lexsort((idx, -a, -score))[0]]
        picks.append(i)
        alive[i] = False
        nov = np.minimum(nov, (1 - X @ X[i]).astype(np.float32))
    return np.array(picks)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.6, 1.0])
def test_greedy_fast_path_equals_brute_force(lam):
    rng = np.random.default_rng(0)
    X = unit(rng.normal(size=(400, 8)))
    align = rng.random(400)
    align[rng.choice(400, 150, replace=False)] = -np.inf  # a block of tied, unaligned rows
    X[1] = X[0]  # an exact duplicate
    greedy = Greedy(400, lam, lambda i: (np.arange(400), X @ X[i]))
    got = np.concatenate([greedy.block(align, 30)["index"], greedy.block(align[::-1], 30)["index"]])
    ref = reference_greedy([align, align[::-1]], X, lam, 30)  # block 2 goes on from block 1
    assert got.tolist() == ref.tolist()
    assert len(set(got.tolist())) == 60


@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_greedy_deep_into_the_unaligned_tail_equals_brute_force(lam):
    """Most rows at −inf (a kNN-sparse pool) and picks far into them, with duplicate groups in
    the tail, so that the tail's top novelty bin runs out and near-duplicates come last."""
    rng = np.random.default_rng(1)
    X = unit(rng.normal(size=(300, 4)))
    X[250:] = X[200:250]  # 50 tail rows each with an exact copy
    align = np.full(300, -np.inf)
    align[rng.choice(300, 40, replace=False)] = rng.random(40)
    greedy = Greedy(300, lam, lambda i: (np.arange(300), X @ X[i]))
    got = np.concatenate([greedy.block(align, 130)["index"], greedy.block(align, 130)["index"]])
    ref = reference_greedy([align, align], X, lam, 130)
    assert got.tolist() == ref.tolist()


def test_evoselect_aligned_and_free_of_near_duplicates(data):
    """k = 150, the number of distinct aligned candidates (see test below for k = 200)."""
    G, V, _ = data
    sel = select(G, V, 150, method="evoselect")
    S = centred_cos(G, sel.indices)
    assert (sel.indices < N_ALIGNED).mean() >= 0.9
    assert (S.max(axis=1) > 0.98).mean() <= 0.02
    d = sel.diagnostics
    assert d["converged"] and d["target_marginal_err"] < 1e-6
    assert set(d["timing"]) >= {"cost", "ot", "diversification"}


def test_evoselect_k200_takes_every_distinct_aligned_candidate_once(data):
    G, V, src = data
    sel = select(G, V, 200, method="evoselect")
    S = centred_cos(G, sel.indices)
    assert (S.max(axis=1) > 0.98).mean() <= 0.02
    picked = set(sel.indices.tolist())
    groups = [{int(s), 150 + t} for t, s in enumerate(src)] + \
        [{i} for i in range(150) if i not in set(src.tolist())]
    assert sum(bool(g & picked) for g in groups) >= 0.9 * len(groups)


@pytest.mark.xfail(strict=True, reason="infeasible as specified: the aligned 200 hold only 150 "
                   "distinct items, so 180 aligned picks force >= 30 copy pairs (30% of picks "
                   "with a partner at cos > 0.98)")
def test_evoselect_issue_acceptance_literal(data):
    G, V, _ = data
    sel = select(G, V, 200, method="evoselect")
    S = centred_cos(G, sel.indices)
    assert (sel.indices < N_ALIGNED).mean() >= 0.9 and (S.max(axis=1) > 0.98).mean() <= 0.02


def mean_distances(G, V, lams, **kw):
    out = []
    for lam in lams:
        S = centred_cos(G, select(G, V, 200, method="evoselect", lam=lam, **kw).indices)
        np.fill_diagonal(S, 1)
        out.append(float((1 - S).sum() / (len(S) * (len(S) - 1))))
    return out


def test_raising_lam_raises_mean_pairwise_distance(data):
    """Measured in the centred feature space, where novelty lives with ``novelty_pcs=0``."""
    G, V, _ = data
    dist = mean_distances(G, V, [0, 0.25, 0.5, 0.75], novelty_pcs=0)
    assert all(np.diff(dist) >= 0) and dist[-1] > dist[0] + 0.2
    plain = mean_distances(G, V, [0, 0.25, 0.5, 0.75, 1.0], min_share=0, redundant_cos=None)
    assert all(np.diff(plain) > 0)  # the bare rank rule (docs/algorithms.md §3.6)


@pytest.mark.xfail(strict=True, reason="lam = 1 is farthest-point selection, which maximises "
                   "the minimum distance, not the mean; on this fixture it ends 0.5% below 0.75")
def test_raising_lam_monotone_up_to_one(data):
    G, V, _ = data
    assert all(np.diff(mean_distances(G, V, [0, 0.25, 0.5, 0.75, 1.0], novelty_pcs=0)) >= 0)


@pytest.mark.parametrize(("pcs", "least"), [(0, 0.95), (50, 0.85)])
def test_evoselect_sparse_and_knn_paths_agree_with_dense(data, pcs, least):
    """The kNN novelty path updates only a pick's nearest neighbours. Once the shared
    directions are projected out (the default, 16 of this fixture's 64 dims) the residuals are
    flatter and that approximation agrees less with the dense scan: 0.89 of the picks here,
    against 0.99 on the features themselves (sparse OT alone: 1.0 either way)."""
    G, V, _ = data
    dense = select(G, V, 150, method="evoselect", novelty_pcs=pcs)
    fast = select(G, V, 150, method="evoselect", sparse_above=1000, ot_knn=200, novelty="knn",
                  nlist=16, nprobe=16, novelty_pcs=pcs)
    assert fast.diagnostics["sparse"] and fast.diagnostics["novelty"] == "knn"
    assert fast.diagnostics["target_marginal_err"] < 1e-6
    overlap = len(np.intersect1d(dense.indices, fast.indices)) / 150
    assert overlap >= least


def test_evoselect_lava_option(data):
    G, V, _ = data
    sel = select(G, V, 150, method="evoselect", alignment="lava")
    assert (sel.indices < N_ALIGNED).mean() >= 0.9


def test_evoselect_explanations(data):
    G, V, _ = data
    sel = select(G, V, 40, method="evoselect", lam=0.25)
    ex = sel.explain
    np.testing.assert_allclose(ex["score"], ex["alignment_term"] + ex["novelty_term"])
    assert ex["novelty"][0] == 1.0 and (ex["alignment_term"] <= 0.75 + 1e-12).all()
    assert (ex["block"] == np.repeat(np.arange(10), 4)).all()


# ---- bad input ------------------------------------------------------------------------------

def test_bad_inputs(data, caplog):
    G, V, _ = data
    with pytest.raises(SelectError, match="got 2001"):
        select(G, V, 2001)
    with pytest.raises(SelectError, match="got 0"):
        select(G, V, 0)
    with pytest.raises(SelectError, match="target set is empty"):
        select(G, V[:0], 5)
    with pytest.raises(SelectError, match="dim 64 but target features have dim 32"):
        select(G, V[:, :32], 5)
    bad = G.copy()
    bad[17, 3] = np.nan
    with pytest.raises(SelectError, match=r"row 17 \(id 'c17'\)"):
        select(bad, V, 5, ids=[f"c{i}" for i in range(len(G))])
    with pytest.raises(SelectError, match="did you mean 'evoselect'"):
        select(G, V, 5, method="evoselct")
    with pytest.raises(SelectError, match="did you mean 'lam'"):
        select(G, V, 5, lamb=0.3)
    for ratio in (0, 1.5, -0.1):
        with pytest.raises(SelectError, match=r"ratio must be in \(0, 1\]"):
            budget(100, ratio=ratio)
    assert budget(100, ratio=0.1) == 10 and budget(100, ratio=1.0) == 100
    zero = G.copy()
    zero[[0, 5, 9]] = 0
    with caplog.at_level(logging.WARNING):
        sel = select(zero, V, 100, method="evoselect")
    assert "dropped 3 candidate rows of zero norm" in caplog.text
    assert not np.isin([0, 5, 9], sel.indices).any()
    assert np.isnan(sel.scores["alignment"][[0, 5, 9]]).all()
    with pytest.raises(SelectError, match="usable candidates"):
        select(zero[:10], V, 10)
    with pytest.raises(SelectError, match="every target feature has zero norm"):
        select(G, np.zeros_like(V), 5)


def hidden_duplicates(seed=0, d=256, nq=300):
    """MCQ-like features: a strong template direction (3 wordings), an answer-letter direction
    (4 letters) and a weak question direction; half the questions appear twice, in two wordings
    (near-duplicates whose cosine, 0.36, is far below that of other questions of one wording and
    letter, 0.93)."""
    rng = np.random.default_rng(seed)

    def rand(n, norm):
        x = rng.standard_normal((n, d))
        return norm * x / np.linalg.norm(x, axis=1, keepdims=True)

    T, L, Q = rand(3, 3.0), rand(4, 2.0), rand(nq, 1.0)
    rows, qs = [], []
    for q in range(nq):
        letter = rng.integers(4)
        for t in rng.choice(3, size=2 if q % 2 == 0 else 1, replace=False):
            rows.append(T[t] + L[letter] + Q[q] + 0.05 * rng.standard_normal(d))
            qs.append(q)
    V = np.stack([T[rng.integers(3)] + L[rng.integers(4)] + rand(1, 1.0)[0] for _ in range(40)])
    return np.asarray(rows, np.float32), V.astype(np.float32), np.array(qs)


def test_novelty_without_the_shared_directions_sees_hidden_duplicates():
    G, V, qs = hidden_duplicates()
    repeats = {pcs: 150 - len(set(qs[select(G, V, 150, method="evoselect",
                                            novelty_pcs=pcs).indices]))
               for pcs in (0, 50)}
    assert repeats[0] >= 8  # novelty on the features: both wordings of many questions
    assert repeats[50] <= 1, repeats


@pytest.mark.parametrize("n", [40, 500])  # fewer rows than dims (Gram path), and more
def test_principal_directions_match_numpy_svd(n):
    from evoray.select.geometry import UnitRows, principal_directions

    rng = np.random.default_rng(1)
    G = (rng.standard_normal((n, 64)) * np.linspace(5, 0.1, 64)).astype(np.float32)
    U = UnitRows(G, center=True)
    P = principal_directions(U, 6)
    _, _, Vt = np.linalg.svd(U.dense().astype(np.float64), full_matrices=False)
    assert P.shape == (6, 64)
    np.testing.assert_allclose(np.abs(P @ Vt[:6].T), np.eye(6), atol=1e-4)
