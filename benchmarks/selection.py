"""Selection benchmark: time and peak RSS of every selector at N = 10k, 100k, 1M candidates.

    python benchmarks/selection.py                       # all methods, all sizes (resumable)
    python benchmarks/selection.py --sizes 10k,100k --methods evoselect,tsds
    python benchmarks/selection.py --overlap             # dense vs faiss-kNN novelty at 10k
    python benchmarks/selection.py --overlap-diversity   # two- vs one-level k-means at 100k
    python benchmarks/selection.py --readme              # the README's table from the JSON

Features are a seeded Gaussian mixture (50 components, targets from 5 of them), M = 500,
d = 1024, ratio 0.1; stored as float16 from 1M rows (float32 below). Each (method, N) cell runs
in its own subprocess so that its peak RSS (``ru_maxrss``) is its own; ``data`` is the RSS once
the features exist, before selecting. Results are appended to ``benchmarks/results/select.json``
and cells already there are skipped (``--force`` reruns them). A cell whose time, projected from
the method's smaller sizes, exceeds ``--limit`` seconds (30 min) is recorded as ``n/a`` with the
projection instead of being run; one that runs past the limit is stopped and recorded ``n/a``.

Named ``selection.py``, not ``select.py``: a script's folder comes first on ``sys.path``, so a
``benchmarks/select.py`` would shadow the standard library's ``select`` (an extension module on
Linux, not a built-in), which ``subprocess`` imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results", "select.json")
METHODS = ("random", "attribution", "diversity", "attr_div", "tsds", "evoselect")
GROWTH = {"diversity": 2.0, "attr_div": 2.0, "tsds": 1.5}  # assumed exponent with one size only


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s.rstrip("km")) * mult)


def make_data(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture, generated block by block into one preallocated array."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32) / np.sqrt(d)
    dtype = np.float16 if n >= 1_000_000 else np.float32
    G = np.empty((n, d), dtype)
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        r = np.random.default_rng([seed, s])
        comp = r.integers(0, 50, e - s)
        G[s:e] = centres[comp] + r.normal(size=(e - s, d)).astype(np.float32) / np.sqrt(d)
    r = np.random.default_rng([seed, 2**40])
    V = centres[r.integers(0, 5, m)] + r.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
    return G, V.astype(np.float32)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args: argparse.Namespace) -> None:
    """Run one cell and print one JSON line."""
    from evoray.select import select

    G, V = make_data(args.n, args.m, args.d)
    data = rss_gib()
    k = max(1, round(args.ratio * args.n))
    if args.worker == "overlap":
        t0 = time.perf_counter()
        dense = select(G, V, k, method="evoselect", novelty="dense")
        t1 = time.perf_counter()
        sparse = select(G, V, k, method="evoselect", novelty="knn")
        t2 = time.perf_counter()
        overlap = len(np.intersect1d(dense.indices, sparse.indices)) / k
        print(json.dumps({"overlap": overlap, "dense_s": t1 - t0, "knn_s": t2 - t1}))
        return
    if args.worker == "diversity_overlap":  # two-level k-means against one level (2 seeds)
        runs, secs = {}, {}
        for name, kw in (("one", {"two_level_above": 10**9}), ("one_seed1", {
                "two_level_above": 10**9, "seed": 1}), ("two", {"two_level_above": 0})):
            t0 = time.perf_counter()
            runs[name] = select(G, V, k, method="diversity", **kw).indices
            secs[name] = time.perf_counter() - t0
        print(json.dumps({"overlap": len(np.intersect1d(runs["two"], runs["one"])) / k,
                          "seed_overlap": len(np.intersect1d(runs["one_seed1"], runs["one"])) / k,
                          "one_level_s": secs["one"], "two_level_s": secs["two"]}))
        return
    t0 = time.perf_counter()
    sel = select(G, V, k, method=args.worker)
    seconds = time.perf_counter() - t0
    timing = {key: round(v, 2) for key, v in sel.diagnostics.get("timing", {}).items()}
    print(json.dumps({"time_s": seconds, "peak_rss_gib": rss_gib(), "data_rss_gib": data,
                      "timing": timing, "selected": len(sel),
                      "converged": sel.diagnostics.get("converged"),
                      "sparse": sel.diagnostics.get("sparse")}))


def load(path: str = RESULTS) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(results: dict, path: str = RESULTS) -> None:
    """Write ``results`` to ``path`` atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def project(results: dict, method: str, n: int) -> float | None:
    """Time at n extrapolated from the method's measured smaller sizes (None: nothing known)."""
    done = sorted((int(key.split("@")[1]), r["time_s"]) for key, r in results.items()
                  if key.startswith(method + "@") and r.get("time_s") and
                  int(key.split("@")[1]) < n)
    if not done:
        return None
    if len(done) >= 2:
        (n1, t1), (n2, t2) = done[-2:]
        p = max(1.0, np.log(max(t2, 1e-3) / max(t1, 1e-3)) / np.log(n2 / n1))
    else:
        p = GROWTH.get(method, 1.0)
    n0, t0 = done[-1]
    return t0 * (n / n0) ** p


def run_cell(args: argparse.Namespace, what: str, n: int, results: dict) -> dict:
    projected = project(results, what, n) if what != "overlap" else None
    if projected is not None and projected > args.limit and not args.force:
        return {"time_s": None, "projected_s": projected, "status": "n/a (projected)"}
    cmd = [sys.executable, __file__, "--worker", what, "--n", str(n), "--m", str(args.m),
           "--d", str(args.d), "--ratio", str(args.ratio)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
    except subprocess.TimeoutExpired:
        return {"time_s": None, "projected_s": projected, "status": f"n/a (> {args.limit} s)"}
    if proc.returncode != 0:
        return {"time_s": None, "status": "failed", "error": proc.stderr[-2000:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def show(results: dict) -> None:
    print(f"{'method':<12}{'N':>9}{'time s':>10}{'peak RSS GiB':>14}{'data GiB':>10}  split")
    for key in sorted(results, key=lambda x: (x.split("@")[0], int(x.split("@")[1]))):
        r = results[key]
        method, n = key.split("@")
        if method == "overlap":
            continue
        if r.get("time_s") is None:
            proj = r.get("projected_s")
            note = f"projected {proj / 60:.0f} min" if proj else r.get("status", "")
            print(f"{method:<12}{int(n):>9}{'n/a':>10}{'':>14}{'':>10}  {note}")
            continue
        t = r.get("timing", {})
        split = ", ".join(f"{k} {t[k]}" for k in ("cost", "ot", "diversification") if k in t)
        print(f"{method:<12}{int(n):>9}{r['time_s']:>10.1f}{r['peak_rss_gib']:>14.2f}"
              f"{r['data_rss_gib']:>10.2f}  {split}")
    for key, r in results.items():
        if key.startswith("diversity_overlap@") and r.get("overlap") is not None:
            print(f"diversity overlap two-level vs one-level k-means at N={key.split('@')[1]}: "
                  f"{r['overlap']:.1%} (one level, seed 1 vs seed 0: {r['seed_overlap']:.1%}; "
                  f"one level {r['one_level_s']:.1f} s, two levels {r['two_level_s']:.1f} s)")
        if key.startswith("overlap@"):
            print(f"novelty overlap dense vs faiss kNN at N={key.split('@')[1]}: "
                  f"{r['overlap']:.1%} (dense {r['dense_s']:.1f} s, kNN {r['knn_s']:.1f} s)")


README = os.path.join(os.path.dirname(__file__), "..", "README.md")
MARK = ("<!-- select-table: benchmarks/selection.py --readme -->", "<!-- /select-table -->")


def table_md(results: dict) -> str:
    """The README's table: one row per method, one column per size, ``time / peak RSS``."""
    sizes = sorted({int(k.split("@")[1]) for k in results if k.split("@")[0] in METHODS})
    name = {10_000: "10k", 100_000: "100k", 1_000_000: "1M"}
    lines = ["| method | " + " | ".join(name.get(n, str(n)) for n in sizes) + " |",
             "|---" * (len(sizes) + 1) + "|"]
    for method in METHODS:
        cells = []
        for n in sizes:
            r = results.get(f"{method}@{n}")
            if r is None:
                cells.append("")
            elif r.get("time_s") is None:
                proj = r.get("projected_s")
                cells.append(f"not run (projected {proj / 60:.0f} min)" if proj else
                             r.get("status", ""))
            else:
                cells.append(f"{r['time_s']:.1f} s / {r['peak_rss_gib']:.2f} GiB")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(results: dict) -> None:
    """Replace the table between the README's markers."""
    with open(README) as f:
        text = f.read()
    a, b = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
    with open(README, "w") as f:
        f.write(text[:a] + "\n" + table_md(results) + "\n" + text[b:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10k,100k,1M")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--limit", type=float, default=1800.0, help="seconds per cell")
    ap.add_argument("--force", action="store_true", help="rerun cells already recorded")
    ap.add_argument("--overlap", action="store_true", help="dense vs kNN novelty at 10k")
    ap.add_argument("--overlap-diversity", action="store_true",
                    help="two-level vs one-level k-means diversity picks at 100k")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite the README's table from the JSON (runs nothing)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = load()
    if args.readme:
        write_readme(results)
        print(table_md(results))
        return
    cells = [("overlap", 10_000)] if args.overlap else [("diversity_overlap", 100_000)] \
        if args.overlap_diversity else [
        (method, parse_size(s)) for s in args.sizes.split(",")
        for method in args.methods.split(",")]
    for what, n in cells:
        key = f"{what}@{n}"
        if key in results and not args.force:
            continue
        print(f"running {key} ...", file=sys.stderr, flush=True)
        results[key] = run_cell(args, what, n, results)
        save(results)
    show(results)


if __name__ == "__main__":
    main()
