"""Load: the features stage over a large pool within fixed memory limits.

``featurize`` (:func:`evoray.features.stage.featurize`) over a pool of ``--n`` candidates (default
100,000, the built-in ``arithmetic`` task's simulated ``weak`` generator) with the ``tiny-llama``
proxy on 2 feature actors (``features.num_actors=2``, ``num_cpus=0.5`` each: a 2-CPU machine),
on a local Ray started with a 2 GiB object store. Shows three limits:

* **object store**: peak use stays within ``--store-gb`` (2 GiB);
* **no spilling**: Ray spills nothing to disk (nor falls back to a file-backed mmap);
* **driver memory**: peak RSS of this process stays under ``--rss-gb`` (2 GB).

How each figure is measured, while ``featurize`` runs in the main thread:

* object-store use, spill and fallback bytes: a background thread runs Ray's public CLI,
  ``ray memory --stats-only``, every ``--interval`` seconds (about 1 s a call) and reads its
  aggregate store stats: ``Plasma memory usage`` (MiB), ``Spilled`` (MiB, cumulative) and
  ``Plasma filesystem mmap usage`` (fallback allocations); the peak is the largest sample. At
  the end, the same stats once more (spilling is cumulative, so a spill between two samples is
  still counted) and the bytes of files in Ray's spill directory (this Ray's own session
  folder), sampled as well. The CLI reports MiB, so a spill under 1 MiB shows only in the
  spill-folder bytes, which count every byte;
* driver RSS: the same thread samples ``psutil.Process().memory_info().rss``; the kernel's own
  peak, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, covers the whole process life (imports,
  Ray start), with no sampling gap. The pool is generated in a subprocess so that it does not count.

Prints a table, exits with status 1 if a limit is missed; writes ``benchmarks/results/scale.json``
and ``benchmarks/results/scale.md``, and keeps one row per pool size in
``benchmarks/results/scale_sizes.json`` (the table "Object-store peak by pool size": run it with
``--n 50000``, ``100000`` and ``200000`` to see whether the peak is flat in N).

    python benchmarks/scale.py [--n 100000] [--out runs/scale] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# A hermetic local benchmark: no token file to write or read (Ray 2.60 enables token auth).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil

RESULTS = Path(__file__).parent / "results"
GiB = 1024**3
MODEL, TASK = "tiny-llama", "arithmetic"
SELECT_MARK = "## Selection, sharded"  # benchmarks/scale_select.py's section of scale.md


def make_pool(n: int, work: Path) -> tuple[str, float]:
    """The task's pool of ``n`` candidates (reused if already written with that size), written by
    a subprocess so that its memory is not the driver's. Returns (path, seconds)."""
    folder = work / f"pool-{n}"
    pool, summary = folder / "pool.jsonl", folder / "task.json"
    if pool.exists() and summary.exists() and json.loads(summary.read_text())["pool_size"] == n:
        return str(pool), 0.0
    t0 = time.perf_counter()
    code = ("import sys; from evoray.tasks import write_task; "
            "write_task(sys.argv[1], sys.argv[2], pool_size=int(sys.argv[3]), seed=0)")
    subprocess.run([sys.executable, "-c", code, TASK, str(folder), str(n)], check=True)
    return str(pool), time.perf_counter() - t0


def spill_dir() -> str:
    """This Ray's session folder, under which its default object spilling writes
    (``ray_spilled_objects*``). ``main`` gives this benchmark's Ray a temp folder of its own
    (``RAY_TMPDIR``), so ``session_latest`` there is this session's, whatever other Ray runs."""
    import ray

    return os.path.join(ray.get_runtime_context().get_temp_dir(), "session_latest")


MIB = 1024**2
# Ray's CLI beside this interpreter (a venv run without activation), else on PATH
RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")
RAY_CLI = RAY_CLI if os.path.exists(RAY_CLI) else "ray"
_FULL = r"Plasma memory usage \d+ MiB, \d+ objects, ([\d.]+)% full"
_STATS = {"used": r"Plasma memory usage (\d+) MiB, (\d+) objects",
          "spilled": r"Spilled (\d+) MiB, (\d+) objects",
          "fallback": r"Plasma filesystem mmap usage: (\d+) MiB"}


def store_stats(address: str, capacity: int = 0) -> dict:
    """The aggregate object-store figures of ``ray memory --stats-only`` (bytes; MiB precision):
    ``used``, ``objects``, ``spilled``, ``spilled_objects``, ``fallback`` (absent lines: 0).
    Given the store's ``capacity``, ``used`` is read from its "% full" instead (two decimals:
    0.01% of a 2 GiB store is 0.2 MiB), when that is finer than the whole MiB."""
    import re

    out = subprocess.run([RAY_CLI, "memory", "--stats-only", "--address", address],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    stats = {"used": 0, "objects": 0, "spilled": 0, "spilled_objects": 0, "fallback": 0}
    for key, pattern in _STATS.items():
        m = re.search(pattern, out)
        if m:
            stats[key] = int(m.group(1)) * MIB
            if key in ("used", "spilled"):
                stats["objects" if key == "used" else "spilled_objects"] = int(m.group(2))
    m = re.search(_FULL, out)
    if m and capacity:
        stats["used"] = max(stats["used"], round(float(m.group(1)) / 100 * capacity))
    return stats


def spilled_file_bytes(root: str | None) -> int:
    """Bytes of spilled-object files under ``root`` (Ray names their folder
    ``ray_spilled_objects*``)."""
    total = 0
    if root and os.path.isdir(root):
        for d, _, files in os.walk(root):
            if "ray_spilled_objects" in d:
                total += sum(os.path.getsize(os.path.join(d, f)) for f in files
                             if os.path.exists(os.path.join(d, f)))
    return total


class Sampler(threading.Thread):
    """Samples the raylet's store stats, the spill folder and this process's RSS until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import ray

        self.interval = interval
        self.address = ray.get_runtime_context().gcs_address
        self.capacity = int(ray.cluster_resources().get("object_store_memory", 0))
        self.proc = psutil.Process()
        self.spill_root = spill_dir()
        self.samples: list[dict] = []
        self.errors = 0
        self._halt = threading.Event()

    def sample(self) -> dict:
        s = {"t": time.perf_counter(), "rss": self.proc.memory_info().rss,
             "spill_files": spilled_file_bytes(self.spill_root)}
        try:
            s.update(store_stats(self.address, self.capacity))
        except (subprocess.SubprocessError, OSError):  # a slow reply: keep the RSS sample
            self.errors += 1
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        last = self.sample()
        self.samples.append(last)
        return last

    def peak(self, key: str) -> int:
        return max((s[key] for s in self.samples if key in s), default=0)


def sizes_section(result: dict) -> str:
    """Record this run in ``results/scale_sizes.json`` (one row a pool size, the last run of
    each) and return the Markdown of every size: is the object-store peak flat in N?"""
    path = RESULTS / "scale_sizes.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[str(result["candidates"])] = {k: result[k] for k in (
        "candidates", "wall_s", "peak_object_store_bytes", "spilled_bytes_total",
        "peak_driver_rss_bytes", "batch_size", "dim", "peak_object_store_objects",
        "store_samples")}
    path.write_text(json.dumps(rows, indent=1) + "\n")
    md = ["## Object-store peak by pool size", "",
          "One `python benchmarks/scale.py --n N` run a row (the last one of each N). Peak "
          "object store: the `Plasma memory usage` line of `ray memory --stats-only`, read "
          "from its \"% full\" (0.01% of the store: 0.2 MiB at 2 GiB; runs before "
          "2026-12-06 07:30 read its whole MiB, rounded down); peak objects: its object count "
          "(each unit of work is a small block of its own, so it grows with N, not the "
          "bytes):", "",
          "| candidates | wall time | peak object store | peak objects | store samples | spilled "
          "| peak driver RSS |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows.values(), key=lambda r: r["candidates"]):
        mib = r["peak_object_store_bytes"] / 2**20
        md.append(f"| {r['candidates']:,} | {r['wall_s']:.0f} s | "
                  f"{f'{mib:.1f} MiB' if mib else '0'} | "
                  f"{r.get('peak_object_store_objects', '')} | {r.get('store_samples', '')} | "
                  f"{r['spilled_bytes_total']:,} | {r['peak_driver_rss_bytes'] / 1e9:.2f} GB |")
    peaks = [r["peak_object_store_bytes"] for r in rows.values()]
    if len(peaks) > 1:
        md += ["", f"Largest peak / smallest: {max(peaks) / max(min(peaks), 1):.2f}."]
    return "\n".join(md) + "\n"


def fmt_gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="candidates in the pool")
    ap.add_argument("--out", default="runs/scale", help="work folder (pool and features)")
    ap.add_argument("--batch-size", type=int, default=16, help="features.batch_size")
    ap.add_argument("--actors", type=int, default=2, help="features.num_actors")
    ap.add_argument("--store-gb", type=float, default=2.0, help="object store size and limit, GiB")
    ap.add_argument("--rss-gb", type=float, default=2.0, help="driver peak RSS limit, GB (1e9)")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling period, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the features folder")
    args = ap.parse_args()

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    pool, pool_s = make_pool(args.n, work)
    print(f"pool: {args.n} candidates in {pool} ({pool_s:.1f} s to generate)", flush=True)

    import pyarrow.parquet as pq
    import ray

    from evoray.config import FeaturesConfig
    from evoray.features.stage import featurize

    store = int(args.store_gb * GiB)
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="evoray-scale-")  # a session of its own
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=store,
             configure_logging=False, log_to_driver=False)
    features = work / "features"
    shutil.rmtree(features, ignore_errors=True)  # always compute (no reuse by input hash)
    cfg = FeaturesConfig(num_actors=args.actors, num_cpus=0.5, batch_size=args.batch_size)
    try:
        sampler = Sampler(args.interval)
        sampler.start()
        rss_before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        featurize(pool, MODEL, cfg=cfg, out=str(features))
        wall = time.perf_counter() - t0
        last = sampler.stop()
        summary = subprocess.run([RAY_CLI, "memory", "--stats-only", "--address",
                                  sampler.address], capture_output=True, text=True,
                                 timeout=30).stdout
        spill_root = sampler.spill_root
        spill_left = spilled_file_bytes(spill_root)
    finally:
        ray.shutdown()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    meta = json.loads((features / "meta.json").read_text())
    files = sorted(features.glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    if rows != args.n or meta["count"] != args.n:
        print(f"error: {rows} feature rows (meta count {meta['count']}) for {args.n} candidates",
              file=sys.stderr)
        return 2

    store_samples = [s for s in sampler.samples if "used" in s]
    peak_store = sampler.peak("used")
    spilled = max(last.get("spilled", 0), sampler.peak("spilled"))
    fallback = sampler.peak("fallback")
    peak_spill_files = max(sampler.peak("spill_files"), spill_left)
    peak_rss = max(sampler.peak("rss"), maxrss)
    limits = {
        "object_store": {"value": peak_store, "limit": store, "pass": peak_store <= store},
        "no_spill": {"value": spilled + fallback + peak_spill_files, "limit": 0,
                     "pass": spilled == 0 and fallback == 0 and peak_spill_files == 0},
        "driver_rss": {"value": peak_rss, "limit": int(args.rss_gb * 1e9),
                       "pass": peak_rss < args.rss_gb * 1e9},
    }
    t_start = sampler.samples[0]["t"]
    step = max(1, len(store_samples) // 60)
    result = {
        "candidates": args.n, "model": MODEL, "task": TASK, "num_actors": args.actors,
        "num_cpus_per_actor": 0.5, "batch_size": args.batch_size, "dim": meta["dim"],
        "wall_s": round(wall, 1), "samples_per_s": round(args.n / wall, 1),
        "featurize_seconds_meta": meta["seconds"],
        "object_store_bytes": store, "peak_object_store_bytes": peak_store,
        "peak_object_store_objects": sampler.peak("objects"),
        "spilled_bytes_total": spilled, "spilled_objects_total": last.get("spilled_objects", 0),
        "fallback_mmap_bytes_peak": fallback, "spill_dir": spill_root,
        "spill_dir_bytes_peak": peak_spill_files, "spill_dir_bytes_end": spill_left,
        "driver_rss_before_bytes": rss_before, "peak_driver_rss_sampled_bytes": sampler.peak("rss"),
        "driver_maxrss_bytes": maxrss, "peak_driver_rss_bytes": peak_rss,
        "store_samples": len(store_samples), "store_sample_misses": sampler.errors,
        "interval_s": args.interval,
        "limits": limits, "pass": all(v["pass"] for v in limits.values()),
        "memory_summary": summary,
        "timeline": [{"t": round(s["t"] - t_start, 1), "store": s["used"], "rss": s["rss"]}
                     for s in store_samples[::step]],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "methods": {
            "object_store": "Plasma memory usage of `ray memory --stats-only`, sampled",
            "spilled": "Spilled of `ray memory --stats-only` (cumulative) + Plasma filesystem "
                       "mmap usage (sampled) + bytes of files in the spill dir (sampled)",
            "driver_rss": "max of psutil RSS samples and getrusage(RUSAGE_SELF).ru_maxrss",
        },
    }

    table = [
        ("candidates", f"{args.n:,}", ""),
        ("wall time", f"{wall:.1f} s", ""),
        ("samples/s", f"{args.n / wall:.0f}", ""),
        ("peak object store", fmt_gb(peak_store), f"<= {fmt_gb(store)}"),
        ("bytes spilled", f"{spilled + fallback + peak_spill_files:,}", "0"),
        ("peak driver RSS", f"{peak_rss / 1e9:.2f} GB", f"< {args.rss_gb:.0f} GB"),
    ]
    verdict = {"peak object store": limits["object_store"]["pass"],
               "bytes spilled": limits["no_spill"]["pass"],
               "peak driver RSS": limits["driver_rss"]["pass"]}
    head = f"{'figure':<18} {'value':>12} {'limit':>12} {'result':>7}"
    print(f"\nfeaturize {MODEL}, {args.actors} actors x 0.5 CPU, batch {args.batch_size}, "
          f"dim {meta['dim']}, Ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"{len(store_samples)} store samples every {args.interval} s")
    print(head)
    print("-" * len(head))
    md = ["| figure | value | limit | result |", "| --- | ---: | ---: | --- |"]
    for name, value, limit in table:
        ok = "" if name not in verdict else ("pass" if verdict[name] else "FAIL")
        print(f"{name:<18} {value:>12} {limit:>12} {ok:>7}")
        md.append(f"| {name} | {value} | {limit} | {ok} |")
    print(f"(driver RSS: {rss_before / 1e9:.2f} GB before featurize, sampled peak "
          f"{sampler.peak('rss') / 1e9:.2f} GB, ru_maxrss {maxrss / 1e9:.2f} GB; spilled: "
          f"{spilled} by Ray's stats, fallback mmap {fallback}, "
          f"spill-dir files {peak_spill_files})")

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    by_size = sizes_section(result)
    md_path = RESULTS / "scale.md"  # keeps the section benchmarks/scale_select.py writes
    kept = md_path.read_text().partition(SELECT_MARK) if md_path.exists() else ("", "", "")
    md_path.write_text(
        f"# featurize at scale: {args.n:,} candidates\n\n"
        f"`python benchmarks/scale.py --n {args.n} --batch-size {args.batch_size}`: "
        f"{MODEL} on {args.actors} feature actors (0.5 CPU each), dim {meta['dim']}, local Ray "
        f"{ray.__version__} with a {fmt_gb(store)} object store, {os.cpu_count()} CPUs.\n\n"
        + "\n".join(md) + "\n\n"
        "Object store: `Plasma memory usage` of `ray memory --stats-only`, sampled every "
        f"{args.interval} s. Spilled: its cumulative `Spilled`, plus file-backed fallback "
        "allocations and files in the spill folder. Driver RSS: the larger of psutil "
        "samples and `getrusage` `ru_maxrss` (the whole process life).\n\n" + by_size
        + (f"\n{kept[1]}{kept[2]}" if kept[1] else ""))
    if not args.keep:
        shutil.rmtree(features, ignore_errors=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
