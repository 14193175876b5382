"""The ``evoray`` command line.

Errors caused by input (bad files, configs, models) print one line, ``evoray: error: ...``, and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evoray.errors import EvorayError

log = logging.getLogger("evoray")


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from evoray.tasks import FAMILIES, PRESETS

    for name, fam in FAMILIES.items():
        print(f"{name:<16} {fam.description}")
    print("\ngenerator presets (shares of clean / wrong_label / off_task / near_duplicate):")
    for name, mix in PRESETS.items():
        print(f"  {name:<7}" + " / ".join(f"{v:.0%}" for v in mix.values()))
    return 0


def _cmd_tasks_make(args: argparse.Namespace) -> int:
    from evoray.tasks import write_task

    paths = write_task(args.task, args.out, pool_size=args.pool_size, generator=args.generator,
                       seed=args.seed, fmt=args.format)
    for name, path in paths.items():
        print(f"{name:<8} {path}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from evoray.config import dump_config, load_config

    path, overrides = args.config, list(args.overrides)
    if path and "=" in path:  # `evoray config key=value` without a file
        path, overrides = None, [path, *overrides]
    print(dump_config(load_config(path, overrides)), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Generate a pool, compute features, select (see :mod:`evoray.demo`)."""
    from evoray.demo import run_demo

    run_demo(model=args.model, task=args.task, generator=args.generator,
             pool_size=args.pool_size, ratio=args.ratio, seed=args.seed, num_cpus=args.num_cpus,
             out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evoray", description="Targeted LLM adaptation with "
                                     "little data: EvoSelect's generate -> select -> train, on "
                                     "Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tasks = sub.add_parser("tasks", help="built-in targeted tasks and the simulated generator")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    tsub.add_parser("list", help="list task families and generator presets").set_defaults(
        func=_cmd_tasks_list)
    make = tsub.add_parser("make", help="write pool, targets, dev, test and train files")
    make.add_argument("--task", required=True, help="task family (see `evoray tasks list`)")
    make.add_argument("--pool-size", type=int, default=2000, help="candidates in the pool")
    make.add_argument("--generator", choices=("weak", "strong"), default="weak")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    make.add_argument("--out", required=True, help="output folder (path or URI)")
    make.set_defaults(func=_cmd_tasks_make)

    config = sub.add_parser("config", help="validate a config and print it with overrides applied")
    config.add_argument("config", nargs="?", help="YAML file (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="key=value, e.g. select.ratio=0.05")
    config.set_defaults(func=_cmd_config)

    demo = sub.add_parser("demo", help="generate a pool, compute features and select, on a "
                          "local Ray (embedded defaults)")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--task", default="arithmetic")
    demo.add_argument("--generator", choices=("weak", "strong"), default="weak")
    demo.add_argument("--pool-size", type=int, default=60)
    demo.add_argument("--ratio", type=float, default=0.25, help="selection budget")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)

    from evoray.features.cli import register as register_features

    register_features(sub)

    from evoray.select.cli import register as register_select

    register_select(sub)

    from evoray.train.cli import register as register_train

    register_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return args.func(args)
    except (EvorayError, OSError) as e:
        if args.debug:
            raise
        message = str(e).replace("\n", " ")
        print(f"evoray: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
