"""Ray job: the evolve loop (generate → select → train, round after round) of a job config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evolve.py --config jobs/configs/gpu_cluster.yaml [key=value ...] [--resume]

The driver joins the cluster the job runs in; ``evolve.run_dir`` (and ``train.storage_path``)
should be shared storage (``s3://...``) on a multi-node cluster. A job that fails can be
resubmitted with ``--resume``: finished stages are skipped. The exit status is non-zero when the
loop fails, and ``ray job submit`` reports the job as failed.
"""

from __future__ import annotations

import argparse
import sys

from evoray.cli import main as evoray_main


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="job YAML (see jobs/configs/)")
    p.add_argument("--resume", action="store_true", help="skip the stages already finished")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. select.ratio=0.05")
    args = p.parse_args(argv)
    return evoray_main(["evolve", args.config, *args.overrides,
                        *(["--resume"] if args.resume else [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
