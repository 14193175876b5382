"""Load: EvoSelect (or TSDS) with ``select.backend: sharded`` on pools that need not fit on the
driver.

    python benchmarks/scale_select.py --sizes 1m,2m,4m           # one row a size
    python benchmarks/scale_select.py --sizes 10m --shards 4 --interval 5   # the 10M row
    python benchmarks/scale_select.py --overlap 100k              # sharded vs local picks
    python benchmarks/scale_select.py --overlap 100k --method tsds

Each size is a pool of float16 features, d = ``--dim`` (256), written once under ``--work``
(``select-<N>x<dim>``) in files of 250,000 rows (an ``--overlap`` pool: 8 files), each a range
of rows: a Gaussian mixture of 50 components, the data of ``benchmarks/selection.py``, with 500
targets from 5 components. The pool is written by this process; a cell then runs in a fresh
subprocess: a local Ray (2 CPUs, a ``--store-gb`` object store, its own temp folder), then
:func:`evoray.select.io.select_files` with ``backend: sharded``, evoselect at ratio
``--ratio`` (0.01), default settings (above 100,000 candidates: kNN-sparse OT and kNN novelty;
``--method tsds``: TSDS, default settings, IVF neighbours above 20,000 candidates).
Measured as ``benchmarks/scale.py`` measures (its ``Sampler``): the driver's peak RSS (psutil
samples and ``ru_maxrss``), the object store's peak and the bytes spilled (``ray memory
--stats-only`` and the spill folder), plus the shard actors' peak RSS (psutil samples of the
``FeatureShard`` processes, largest one and their sum).

Each object-store sample starts ``ray memory`` (about a core-second on a busy 2-core machine):
``--interval 5`` for the long 10M run. ``--shards 4`` there: shards of 2.5M rows (about 3 GiB
each, 12 GiB in all) instead of the default 20 of 500k, which each carry a Ray worker's own
memory and a call per pick.

``--overlap N`` selects from one pool of N rows with the local backend and with 4 shards and
reports the overlap of the picks and the OT's target-marginal error.

Results: ``benchmarks/results/scale_select.json`` (resumable: a finished cell is not rerun), and
the table in ``benchmarks/results/scale.md`` (section "Selection, sharded").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import psutil

RESULTS = Path(__file__).parent / "results"
FILE_ROWS = 250_000
MARK = "## Selection, sharded"


def parse_size(s: str) -> int:
    s = s.strip().lower()
    return int(float(s.rstrip("km")) * {"k": 1_000, "m": 1_000_000}.get(s[-1], 1))


def make_pool(n: int, d: int, work: Path) -> tuple[str, str]:
    """Features and targets folders of the mixture (reused when complete)."""
    import pyarrow.parquet as pq

    from evoray.data.features import features_table, write_features

    root = work / f"select-{n}x{d}"
    feats, targets = root / "features", root / "targets"
    if (root / "done").exists():
        return str(feats), str(targets)
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, d)).astype(np.float32) / np.sqrt(d)
    step = FILE_ROWS if n >= 1_000_000 else max(n // 8, 1)  # an --overlap pool: 8 files
    for s in range(0, n, step):
        e = min(s + step, n)
        r = np.random.default_rng([0, s])
        X = centres[r.integers(0, 50, e - s)] + r.normal(size=(e - s, d)).astype(
            np.float32) / np.sqrt(d)
        rows = np.arange(s, e)
        pq.write_table(features_table(rows.astype(str), rows, X.astype(np.float16),
                                      np.ones(e - s), np.ones(e - s)),
                       feats / f"part-{s:09d}.parquet")
    r = np.random.default_rng([0, 2**40])
    V = centres[r.integers(0, 5, 500)] + r.normal(size=(500, d)).astype(np.float32) / np.sqrt(d)
    write_features(str(targets), [f"t{j}" for j in range(500)], V.astype(np.float16))
    (root / "done").write_text("")
    return str(feats), str(targets)


class ShardRSS(threading.Thread):
    """Peak RSS of the ``FeatureShard`` actor processes: the largest one and their sum."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_one = self.peak_sum = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = []
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if "FeatureShard" in " ".join(p.info["cmdline"] or []):
                        rss.append(p.memory_info().rss)
                except psutil.Error:
                    continue
            self.peak_one = max(self.peak_one, max(rss, default=0))
            self.peak_sum = max(self.peak_sum, sum(rss))
            self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def cell(a) -> dict:
    """One selection in this process (the subprocess a cell runs in)."""
    import resource

    import ray
    import scale

    from evoray.config import SelectConfig
    from evoray.config.sections import EvoSelectSettings
    from evoray.select.io import select_files

    feats, targets = make_pool(a.n, a.dim, Path(a.work))
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir=a.work)
    ray.init(num_cpus=2, object_store_memory=int(a.store_gb * 2**30), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    sampler, shards = scale.Sampler(a.interval), ShardRSS()
    sampler.start()
    shards.start()
    out = {}
    for backend in (("local", "sharded") if a.overlap else ("sharded",)):
        cfg = SelectConfig(method=a.method, ratio=a.ratio, backend=backend, shards=a.shards,
                           evoselect=EvoSelectSettings(novelty_codec=a.codec))
        t0 = time.perf_counter()
        summary, sel, _ = select_files(cfg, feats, targets, f"{a.work}/out-{a.n}-{backend}")
        out[backend] = {"seconds": time.perf_counter() - t0, "picks": sel.indices.tolist(),
                        "diagnostics": summary["diagnostics"]}
    last = sampler.stop()
    shards.stop()
    diag = out["sharded"]["diagnostics"]
    res = {"n": a.n, "dim": a.dim, "ratio": a.ratio, "k": len(out["sharded"]["picks"]),
           "method": a.method, "shards": diag["shards"], "codec": a.codec,
           "seconds": out["sharded"]["seconds"], "timing": diag["timing"],
           "marginal_err": diag.get("target_marginal_err"),
           "driver_rss": max(sampler.peak("rss"),
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
           "store_peak": sampler.peak("used"),
           "spilled": max(last.get("spilled", 0), sampler.peak("spill_files")),
           "shard_rss_max": shards.peak_one, "shard_rss_sum": shards.peak_sum,
           "store_gb": a.store_gb, "when": time.strftime("%Y-%m-%d %H:%M")}
    if a.overlap:
        local = set(out["local"]["picks"])
        res["overlap"] = len(local & set(out["sharded"]["picks"])) / len(local)
        res["local_seconds"] = out["local"]["seconds"]
        if a.method == "tsds":  # the largest difference of any candidate's probability
            import pyarrow.parquet as pq

            p = [pq.read_table(f"{a.work}/out-{a.n}-{b}/scores.parquet").to_pandas()
                 .set_index("id")["probability"] for b in ("local", "sharded")]
            res["max_dp"] = float((p[0] - p[1].loc[p[0].index]).abs().max())
    ray.shutdown()
    return res


def table(results: dict) -> str:
    gb = 2**30
    lines = [MARK, "", "`python benchmarks/scale_select.py`: evoselect (tsds where shown), "
             "`select.backend: sharded`, float16 features, local Ray (2 CPUs) with the object "
             "store shown; driver and shard peak RSS, bytes spilled (see the script's "
             "docstring). k: distinct picks (TSDS draws ratio · N with replacement).", "",
             "| method | N | dim | k | shards, novelty codec | time "
             "| setup / cost / OT / greedy (s) | driver peak RSS | largest shard RSS (all) "
             "| store peak | spilled | overlap with local | when |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(results.values(), key=lambda r: (r.get("overlap") is not None,
                                                     r.get("method", "evoselect"), r["n"])):
        t = r["timing"]
        parts = " / ".join(f"{t[x]:.0f}" for x in ("setup", "cost", "ot", "diversification")) \
            if "setup" in t else "–"
        lines.append(
            f"| {r.get('method', 'evoselect')} | {r['n']:,} | {r['dim']} | {r['k']:,} | "
            f"{r['shards']} {r.get('codec', 'SQfp16') if 'setup' in t else ''} | "
            f"{r['seconds']:.0f} s | {parts} | "
            f"{r['driver_rss'] / gb:.2f} GiB | {r['shard_rss_max'] / gb:.2f} "
            f"({r['shard_rss_sum'] / gb:.2f}) GiB | {r['store_peak'] / gb:.2f} / "
            f"{r['store_gb']:.0f} GiB | {r['spilled']:,} B | "
            + (f"{r['overlap']:.3f} (local {r['local_seconds']:.0f} s"
               + (f", max \\|Δp\\| {r['max_dp']:.1g}" if "max_dp" in r else "") + ")"
               if "overlap" in r
               else "") + f" | {r['when']} |")
    return "\n".join(lines) + "\n"


def write(results: dict) -> None:
    (RESULTS / "scale_select.json").write_text(json.dumps(results, indent=1) + "\n")
    md = RESULTS / "scale.md"
    text = md.read_text() if md.exists() else ""
    text = text.split(MARK)[0].rstrip() + "\n\n" + table(results)
    md.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1m,2m,4m")
    ap.add_argument("--overlap", default=None, help="compare with local at this size")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--method", default="evoselect", choices=("evoselect", "tsds"))
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--codec", default="SQfp16", help="novelty index codec (SQ8: half)")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="object-store sampling period, s (each sample runs `ray memory`)")
    ap.add_argument("--store-gb", type=float, default=2.0)
    ap.add_argument("--work", default="runs/scale")
    ap.add_argument("--force", action="store_true", help="rerun cells already in the results")
    ap.add_argument("--cell", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell is not None:
        a.n = a.cell
        print(json.dumps(cell(a)))
        return
    path = RESULTS / "scale_select.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    sizes = [parse_size(a.overlap)] if a.overlap else [parse_size(s) for s in a.sizes.split(",")]
    a.shards = a.shards or (4 if a.overlap else None)
    os.makedirs(a.work, exist_ok=True)
    for n in sizes:
        key = f"{'overlap' if a.overlap else 'sharded'}|{n}|{a.dim}|{a.ratio}|{a.shards}" + \
            ("" if a.codec == "SQfp16" else f"|{a.codec}") + \
            ("" if a.method == "evoselect" else f"|{a.method}")
        if key in results and not a.force:
            continue
        make_pool(n, a.dim, Path(a.work))  # here, so that the cell's driver RSS is selection's
        cmd = [sys.executable, __file__, "--cell", str(n), "--dim", str(a.dim), "--ratio",
               str(a.ratio), "--store-gb", str(a.store_gb), "--work", os.path.abspath(a.work)]
        cmd += ["--shards", str(a.shards)] if a.shards else []
        cmd += ["--codec", a.codec, "--interval", str(a.interval), "--method", a.method]
        cmd += ["--overlap", a.overlap] if a.overlap else []
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"cell {n} failed:\n{run.stderr[-3000:]}")
        results[key] = json.loads(run.stdout.strip().splitlines()[-1])
        write(results)
        print(table(results))


if __name__ == "__main__":
    main()
