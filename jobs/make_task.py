"""Ray job: write a built-in task's files, then read the pool back through Ray Data on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/make_task.py --task arithmetic --pool-size 2000 --out s3://bucket/tasks/arith

Arguments are those of ``evoray tasks make``. ``--out`` should be shared storage (a URI) on a
multi-node cluster, since the job's driver may run on any node.
"""

from __future__ import annotations

import sys

import ray

from evoray.cli import main as evoray_main
from evoray.data import read_dataset


def main(argv: list[str]) -> int:
    rc = evoray_main(["tasks", "make", *argv])
    if rc != 0:
        return rc
    out = argv[argv.index("--out") + 1].rstrip("/")
    fmt = argv[argv.index("--format") + 1] if "--format" in argv else "jsonl"
    ray.init()
    n = read_dataset(f"{out}/pool.{fmt}", "candidate", columns=["id"]).count()
    print(f"pool checked on the cluster: {n} candidates")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
