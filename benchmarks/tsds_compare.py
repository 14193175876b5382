"""TSDS side by side: evoray's ``tsds`` against the timed reference of the authors' algorithm.

    python benchmarks/tsds_compare.py --sizes 100k:1024,1m:256        # faiss IVF (resumable)
    python benchmarks/tsds_compare.py --check 5k:64                   # exact neighbours, |Δp|
    python benchmarks/tsds_compare.py --sizes 20k:256 --check 5k:64 --force

A size is ``N:d``. The features are ``benchmarks/selection.py``'s Gaussian mixture (``make_data``,
M = ``--m`` 500 targets, float16 from 1M rows), made afresh with the same seed by each side. Each
side runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own: evoray's
:func:`evoray.select.tsds.tsds` (its defaults; exact kNN up to ``exact_max`` candidates, faiss
IVF above) and :func:`tsds_reference.reference_probabilities` (the authors' IVF, heap in
Python), both with alpha 0.5, C 5, sigma 0.75, max_K 5000, kde_K 1000 (capped at N // 10), and
each timed from the features to k = ``--ratio`` · N multinomial draws (the reference's time is
its probabilities plus the same draw). ``--check`` sizes run both sides with exact neighbours
(evoray ``exact_max = N``, reference ``exact=True``); their probabilities must agree within
``--tol`` (1e-9). Each row has both times, their ratio evoray / reference, both peak RSS,
max |p_evoray − p_ref| (``max|Δp|``), the largest relative difference over the supports
(``rel``), the overlap (Jaccard) of the supports {p > 0} and ``assign``: max |Δp| between the
reference's heap and evoray's closed form (``tsds_probabilities``) on the reference's very same
neighbours, distances and densities (untimed), which isolates the assignment from the float32
rounding of the two sides' distance computations.

Results: ``benchmarks/results/tsds_compare.json`` (rewritten atomically after each cell; a cell
already there is skipped unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from quality_cells import hardware
from selection import load, make_data, rss_gib, save

RESULTS = os.path.join(os.path.dirname(__file__), "results", "tsds_compare.json")


def parse_cell(s: str) -> tuple[int, int]:
    """``"100k:1024"`` -> (100000, 1024)."""
    size, d = s.strip().lower().split(":")
    mult = {"k": 1_000, "m": 1_000_000}.get(size[-1], 1)
    return int(float(size.rstrip("km")) * mult), int(d)


def worker(args: argparse.Namespace) -> None:
    """One side of one cell: save p to ``args.out`` and print one JSON line."""
    G, V = make_data(args.n, args.m, args.d)
    data = rss_gib()
    k = max(1, round(args.ratio * args.n))
    if args.worker == "evoray":
        from evoray.select.tsds import tsds

        extra = {"exact_max": args.n} if args.exact else (
            {"exact_max": args.exact_max} if args.exact_max is not None else {})
        t0 = time.perf_counter()
        sel = tsds(G, V, k, seed=0, **extra)
        seconds = time.perf_counter() - t0
        p = sel.scores["probability"]
        row = {"exact_knn": sel.diagnostics["exact_knn"], "drawn": len(sel)}
    else:
        from tsds_reference import heap_probabilities, reference_inputs

        t0 = time.perf_counter()
        dist, idx, rho = reference_inputs(G, V, exact=args.exact, seed=0)
        p = heap_probabilities(dist, idx, rho, args.n)
        counts = np.random.default_rng(0).multinomial(k, p / p.sum())
        seconds = time.perf_counter() - t0
        row = {"exact_knn": args.exact, "drawn": int((counts > 0).sum())}
    row.update(time_s=seconds, peak_rss_gib=rss_gib(), data_rss_gib=data)
    if args.worker == "reference":  # untimed: evoray's closed form on the very same inputs
        from evoray.select.tsds import tsds_probabilities

        row["assignment_dp"] = float(np.abs(tsds_probabilities(dist, idx, rho, args.n) - p).max())
    np.save(args.out, p)
    print(json.dumps(row))


def run_side(args: argparse.Namespace, side: str, n: int, d: int, exact: bool,
             out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--n", str(n), "--d", str(d),
           "--m", str(args.m), "--ratio", str(args.ratio), "--out", out]
    if exact:
        cmd.append("--exact")
    if args.exact_max is not None:
        cmd += ["--exact-max", str(args.exact_max)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
    except subprocess.TimeoutExpired:
        return {"time_s": None, "status": f"n/a (> {args.limit} s)"}
    if proc.returncode != 0:
        return {"time_s": None, "status": "failed", "error": proc.stderr[-2000:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}


def run_cell(args: argparse.Namespace, n: int, d: int, exact: bool) -> dict:
    row = {"n": n, "d": d, "m": args.m, "k": max(1, round(args.ratio * n)), "exact": exact,
           "evoray_exact_max": n if exact else args.exact_max,
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "hardware": hardware()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {side: os.path.join(tmp, f"{side}.npy") for side in ("evoray", "reference")}
        for side, path in paths.items():
            print(f"  {side} ...", file=sys.stderr, flush=True)
            row[side] = run_side(args, side, n, d, exact, path)
        if all(row[side]["status"] == "ok" for side in paths):
            pe, pr = np.load(paths["evoray"]), np.load(paths["reference"])
            se, sr = pe > 0, pr > 0
            row["max_abs_dp"] = float(np.abs(pe - pr).max())
            top = np.maximum(pe, pr)
            rel = np.divide(np.abs(pe - pr), top, out=np.zeros_like(top), where=top > 0)
            row["max_rel_dp"] = float(rel.max())
            row["assignment_dp"] = row["reference"]["assignment_dp"]
            row["support"] = [int(se.sum()), int(sr.sum())]
            row["support_overlap"] = float((se & sr).sum() / max(1, (se | sr).sum()))
            row["ratio"] = row["evoray"]["time_s"] / row["reference"]["time_s"]
            if exact:
                row["within_tol"] = row["max_abs_dp"] <= args.tol
    return row


def show(results: dict) -> None:
    print(f"{'kNN':<6}{'N':>9}{'d':>6}{'evoray s':>10}{'ref s':>9}{'ratio':>7}"
          f"{'RSS evo':>9}{'RSS ref':>9}{'max|Δp|':>10}{'rel':>9}{'assign':>9}{'supp ovl':>9}")
    for key in sorted(results, key=lambda x: (results[x]["exact"], results[x]["n"],
                                              results[x]["d"])):
        r = results[key]
        e, f = r["evoray"], r["reference"]
        head = f"{'exact' if r['exact'] else 'ivf':<6}{r['n']:>9}{r['d']:>6}"
        if "ratio" not in r:
            print(f"{head}  evoray {e['status']}, reference {f['status']}")
            continue
        note = "" if not r["exact"] else ("  ok" if r["within_tol"] else "  > tol")
        if not r["exact"]:
            note = "  (evoray: exact kNN)" if e.get("exact_knn") else "  (both IVF)"
        print(f"{head}{e['time_s']:>10.2f}{f['time_s']:>9.2f}{r['ratio']:>7.2f}"
              f"{e['peak_rss_gib']:>9.2f}{f['peak_rss_gib']:>9.2f}{r['max_abs_dp']:>10.1e}"
              f"{r['max_rel_dp']:>9.1e}{r['assignment_dp']:>9.1e}{r['support_overlap']:>9.1%}{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="", help="N:d cells with faiss IVF, comma-separated")
    ap.add_argument("--check", default="", help="N:d cells with exact neighbours")
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--tol", type=float, default=1e-9, help="max |Δp| at --check sizes")
    ap.add_argument("--exact-max", type=int, default=None,
                    help="evoray's exact_max at --sizes (default: tsds's own default)")
    ap.add_argument("--limit", type=float, default=3600.0, help="seconds per side")
    ap.add_argument("--force", action="store_true", help="rerun cells already recorded")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cells = [(*parse_cell(s), False) for s in args.sizes.split(",") if s.strip()]
    cells += [(*parse_cell(s), True) for s in args.check.split(",") if s.strip()]
    results = load(RESULTS)
    tail = f",exact_max={args.exact_max}" if args.exact_max is not None else ""
    keys = [f"exact@{n}x{d}" if exact else f"ivf@{n}x{d}{tail}" for n, d, exact in cells]
    for key, (n, d, exact) in zip(keys, cells, strict=True):
        if key in results and not args.force:
            continue
        print(f"running {key} ...", file=sys.stderr, flush=True)
        results[key] = run_cell(args, n, d, exact)
        save(results, RESULTS)
    show(results)
    if any(not results[key].get("within_tol", True) for key in keys):
        sys.exit(1)


if __name__ == "__main__":
    main()
