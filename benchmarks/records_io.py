"""Record I/O speed: JSONL vs Parquet, validated reads on the driver (pyarrow) and Ray Data reads.

    python benchmarks/records_io.py [--pool-size 20000] [--repeats 3]

Prints one table; ratios are against the JSONL driver read measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from evoray.data import read_dataset, read_records, write_records
from evoray.tasks import make_splits, simulate_pool


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pool = simulate_pool(make_splits("arithmetic"), args.pool_size, "weak")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jsonl", "parquet"):
            path = os.path.join(tmp, f"pool.{fmt}")
            write = _best(lambda p=path: write_records(pool, p, "candidate"), args.repeats)
            read = _best(lambda p=path: read_records(p, "candidate"), args.repeats)
            rows.append((fmt, os.path.getsize(path) / 2**20, write, read))
        import ray

        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_rows = []
        for fmt in ("jsonl", "parquet"):
            path = os.path.join(tmp, f"pool.{fmt}")
            ray_rows.append(_best(lambda p=path: read_dataset(p, "candidate").materialize(),
                                  args.repeats))
        ray.shutdown()
    base = rows[0][3]
    print(f"\n{args.pool_size} candidates, best of {args.repeats}")
    print(f"{'format':<8} {'MiB':>6} {'write s':>8} {'read s':>7} {'read vs jsonl':>14} "
          f"{'ray read s':>11}")
    for (fmt, mib, write, read), ray_read in zip(rows, ray_rows, strict=True):
        print(f"{fmt:<8} {mib:>6.1f} {write:>8.3f} {read:>7.3f} {read / base:>13.2f}x "
              f"{ray_read:>11.3f}")


if __name__ == "__main__":
    main()
