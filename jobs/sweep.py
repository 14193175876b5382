"""Ray job: a Tune sweep (select → train → evaluate over features computed once) of a sweep config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config tune_configs/ratio_lambda.yaml [key=value ...] [--resume]

The driver joins the cluster the job runs in; ``sweep.sweep_dir`` (and ``sweep.shared_dir``)
should be shared storage (``s3://...``) on a multi-node cluster, since trials on every node read
the shared features and write their selections there. A job that fails, or is stopped, can be
resubmitted with ``--resume``: Tune restores the experiment, keeps the finished trials and goes on
with the others. The exit status is non-zero when the sweep fails or stops before every trial
finished, and ``ray job submit`` reports the job as failed.
"""

from __future__ import annotations

import argparse
import sys

from evoray.cli import main as evoray_main


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (see tune_configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in sweep.sweep_dir; finished trials are kept")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. sweep.num_samples=2")
    args = p.parse_args(argv)
    return evoray_main(["sweep", args.config, *args.overrides,
                        *(["--resume"] if args.resume else [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
