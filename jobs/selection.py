"""Ray job: select a budget of candidates from features already computed (``evoray select``).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/selection.py --features s3://b/run/round_01/features/pool \
            --targets s3://b/run/round_01/features/targets --pool s3://b/run/round_01/clean.jsonl \
            --out s3://b/selections/ratio05 --ratio 0.05 [--method tsds] [--config job.yaml]

Arguments are those of ``evoray select``. Selection runs on the job's driver (the head node on
cluster.yaml's layout), which needs memory for the features: N x dim x 4 bytes.
"""

from __future__ import annotations

import sys

from evoray.cli import main as evoray_main

if __name__ == "__main__":
    sys.exit(evoray_main(["select", *sys.argv[1:]]))
