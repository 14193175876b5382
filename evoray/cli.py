"""The ``evoray`` command line.

Errors caused by input (bad files, configs, models) print one line, ``evoray: error: ...``, and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evoray.config import apply_override, load_config, parse_overrides
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
    if args.markdown:
        from evoray.config.reference import config_markdown
        from evoray.errors import ConfigError

        if path or overrides:
            raise ConfigError("config --markdown prints the reference of every field with its "
                              "default (docs/config.md); it takes no config file or overrides")
        print(config_markdown(), end="")
        return 0
    if path and "=" in path:  # `evoray config key=value` without a file
        path, overrides = None, [path, *overrides]
    print(dump_config(load_config(path, overrides)), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from evoray.demo import demo_config, run_demo

    over = {"evolve.run_dir": args.out} if args.out else {}
    cfg = demo_config(args.quick, **over)
    for key, value in parse_overrides(args.overrides):
        cfg = apply_override(cfg, key, value)
    run_demo(cfg, resume=args.resume)
    return 0


def _cmd_evolve(args: argparse.Namespace) -> int:
    from evoray.evolve import evolve

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]  # `evoray evolve key=value ...`
    evolve(load_config(config, overrides), resume=args.resume)
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
    config.add_argument("--markdown", action="store_true", help="print every field's type, "
                        "default and help as Markdown instead (docs/config.md)")
    config.set_defaults(func=_cmd_config)

    demo = sub.add_parser("demo", help="an evolve run on embedded defaults on a local Ray "
                          "(SmolLM2-135M, random vs EvoSelect on one round of 1,000 "
                          "candidates), then its report")
    demo.add_argument("--quick", action="store_true",
                      help="tiny random model and small pools (about a minute)")
    demo.add_argument("--out", help="run folder (default runs/demo, or runs/quick)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    demo.add_argument("overrides", nargs="*", help="key=value, e.g. evolve.task=compare")
    demo.set_defaults(func=_cmd_demo)

    evo = sub.add_parser("evolve", help="run the generate -> select -> train loop of a job "
                         "config, round after round")
    evo.add_argument("config", nargs="?", help="job YAML (see jobs/configs/); default: built-in "
                     "defaults")
    evo.add_argument("overrides", nargs="*", help="key=value, e.g. select.ratio=0.05")
    evo.add_argument("--resume", action="store_true",
                     help="continue the run in evolve.run_dir, skipping finished stages")
    evo.set_defaults(func=_cmd_evolve)

    from evoray.features.cli import register as register_features

    register_features(sub)

    from evoray.select_cmd import register as register_select

    register_select(sub)

    from evoray.train.cli import register as register_train

    register_train(sub)

    from evoray.report import register as register_report

    register_report(sub)
    from evoray.tune import register as register_sweep
    register_sweep(sub)
    return parser


def job_main(command: str, argv: list[str]) -> int:
    """``jobs/<command>.py``: ``evoray <command>`` with the same arguments (config file,
    ``section.key=value`` overrides, ``--resume``); the old ``--config`` form is a one-line error
    naming the new one."""
    if "--config" in argv:
        print(f"jobs/{command}.py: error: --config is gone: give the config as `evoray {command}` "
              f"takes it, python jobs/{command}.py CONFIG [section.key=value ...] [--resume]",
              file=sys.stderr)
        return 2
    from evoray.ray_utils import ask_for_token_auth, filter_stderr

    ask_for_token_auth()
    filter_stderr()
    return main([command, *argv])


def main(argv: list[str] | None = None) -> int:
    """The ``evoray`` command. Run as the console script (``argv`` None), a local Ray asks for
    token authentication explicitly (:func:`evoray.ray_utils.ask_for_token_auth`) and Ray's C++
    notices that have no cause to fix are dropped from stderr
    (:func:`evoray.ray_utils.filter_stderr`); a caller passing ``argv`` (tests,
    :func:`job_main`) decides for itself."""
    if argv is None:
        from evoray.ray_utils import ask_for_token_auth, filter_stderr

        if "--address" not in sys.argv:  # `evoray features --address`: the cluster's own mode
            ask_for_token_auth()
        filter_stderr()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from evoray.ray_utils import show_console_errors

    show_console_errors(args.debug)
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
