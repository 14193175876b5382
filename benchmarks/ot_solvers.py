"""evoray's semi-relaxed OT solver against POT's, side by side, on EvoSelect's dense problems.

    python benchmarks/ot_solvers.py [--features POOL TARGETS ...]  # writes results/ot_solvers.json

EvoSelect solves ``min ⟨C,π⟩ + eps·KL(π‖a⊗b) + tau·KL(π1‖a)`` with the target marginal exact
(docs/algorithms.md §3.2). POT has this problem as ``ot.unbalanced.sinkhorn_unbalanced(a, b, C,
eps, reg_m=(tau, inf))``; this script runs it (its default ``sinkhorn`` method and the
log-stabilised ``sinkhorn_stabilized``) and evoray's :class:`~evoray.select.ot.SemiRelaxedOT` on
the same costs (centred cosine costs of random unit features, or of real features with
``--features``: the M targets × N candidates of a first EvoSelect block) at EvoSelect's
``eps = tau = 0.01``, and reports seconds, iterations, whether each stopped converged, the L1
target-marginal error of its plan, and how far its candidate masses (what EvoSelect ranks by) are
from evoray's (relative L1). Every solver gets
the same tolerance (1e-6 on the marginal) and iteration cap (5000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np

SIZES = ((40, 2_000), (40, 20_000), (200, 20_000))


def costs(m: int, n: int, d: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d)).astype(np.float32)
    V = (rng.normal(size=(m, d)) + 0.3).astype(np.float32)
    mu = G.mean(axis=0)
    G, V = G - mu, V - mu
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    return ((1.0 - V @ G.T) / 2).astype(np.float32)  # (M, N)


def real_costs(pool: str, targets: str) -> np.ndarray:
    """Centred cosine costs of a features folder's candidates to its targets, as EvoSelect's
    first block builds them."""
    from evoray.data.features import read_features

    G = read_features(pool).X.astype(np.float32)
    V = read_features(targets).X.astype(np.float32)
    mu = G.mean(axis=0)
    G, V = G - mu, V - mu
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    return ((1.0 - V @ G.T) / 2).astype(np.float32)


def run_evoray(C: np.ndarray, eps: float, tau: float) -> dict:
    from evoray.select.ot import SemiRelaxedOT

    m, n = C.shape
    t0 = time.perf_counter()
    s = SemiRelaxedOT(C, None, n, eps=eps, tau=tau, tol=1e-6, max_iter=5000)
    res = s.solve(np.full(m, 1 / m), np.full(n, 1 / n))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "iterations": res.iterations, "converged": bool(res.converged),
            "marginal_err": float(res.marginal_err), "mass": s.plan().sum(axis=1)}


def run_pot(C: np.ndarray, eps: float, tau: float, method: str) -> dict:
    import ot

    m, n = C.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P, log = ot.unbalanced.sinkhorn_unbalanced(
            a, b, C.T.astype(np.float64), eps, reg_m=(tau, float("inf")), method=method,
            numItermax=5000, stopThr=1e-6, log=True)
    seconds = time.perf_counter() - t0
    err = float(np.abs(P.sum(axis=0) - b).sum()) if np.isfinite(P).all() else float("nan")
    return {"seconds": seconds, "iterations": None, "mass": P.sum(axis=1),
            "converged": bool(np.isfinite(err) and err < 1e-6 and not any(
                "converge" in str(w.message).lower() for w in caught)),
            "marginal_err": err, "warnings": sorted({str(w.message)[:80] for w in caught})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "ot_solvers.json"))
    ap.add_argument("--features", nargs=2, action="append", default=[], metavar=("POOL", "TARGETS"),
                    help="also solve on real features: a pool's and its targets' feature folders "
                         "(repeatable)")
    a = ap.parse_args()
    import ot
    import torch

    rows = []
    print("| costs M × N | solver | seconds | iterations | converged | target-marginal L1 error | "
          "candidate masses, L1 to evoray's |\n|---|---|---:|---:|---|---:|---:|")
    problems = [(f"random {m} × {n}", costs(m, n)) for m, n in SIZES]
    problems += [(f"{os.path.basename(os.path.dirname(p.rstrip('/')))} "
                  f"{read.shape[0]} × {read.shape[1]}", read)
                 for p, t in a.features for read in [real_costs(p, t)]]
    for label, C in problems:
        m, n = C.shape
        ref = None  # evoray's candidate masses, solved first
        for name, fn, extra in (("evoray SemiRelaxedOT", run_evoray, ()),
                                ("POT sinkhorn", run_pot, ("sinkhorn",)),
                                ("POT sinkhorn_stabilized", run_pot, ("sinkhorn_stabilized",))):
            r = {"m": m, "n": n, "solver": name, **fn(C, a.eps, a.tau, *extra)}
            mass = r.pop("mass")
            ref = mass if ref is None else ref
            r["mass_l1_to_evoray"] = float(np.abs(np.asarray(mass) - ref).sum() / ref.sum())
            rows.append(r)
            r["costs"] = label
            print(f"| {label} | {name} | {r['seconds']:.2f} | {r['iterations'] or '–'} | "
                  f"{r['converged']} | {r['marginal_err']:.1e} | {r['mass_l1_to_evoray']:.1e} |",
                  flush=True)
    meta = {"eps": a.eps, "tau": a.tau, "date": time.strftime("%Y-%m-%d"), "pot": ot.__version__,
            "torch_threads": torch.get_num_threads(),
            "hardware": f"CPU only, {os.cpu_count()} cores ({platform.machine()})"}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
