"""Ray job: a Tune sweep (select → train → evaluate over features computed once) of a sweep config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py tune_configs/ratio_lambda.yaml [section.key=value ...] [--resume]

The driver joins the cluster the job runs in; ``sweep.sweep_dir`` (and ``sweep.shared_dir``)
should be shared storage (``s3://...``) on a multi-node cluster, since trials on every node read
the shared features and write their selections there. A job that fails, or is stopped, can be
resubmitted with ``--resume``: Tune restores the experiment, keeps the finished trials and goes on
with the others. The exit status is non-zero when the sweep fails or stops before every trial
finished, and ``ray job submit`` reports the job as failed.
"""

from __future__ import annotations

import sys

from evoray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("sweep", sys.argv[1:]))
