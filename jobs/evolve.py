"""Ray job: the evolve loop (generate → select → train, round after round) of a job config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evolve.py jobs/configs/gpu_cluster.yaml [section.key=value ...] [--resume]

The driver joins the cluster the job runs in; ``evolve.run_dir`` (and ``train.storage_path``)
should be shared storage (``s3://...``) on a multi-node cluster. A job that fails can be
resubmitted with ``--resume``: finished stages are skipped. The exit status is non-zero when the
loop fails, and ``ray job submit`` reports the job as failed.
"""

from __future__ import annotations

import sys

from evoray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evolve", sys.argv[1:]))
