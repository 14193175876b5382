"""The ``evoray`` command line.

Errors caused by input (bad files, configs, models) print one line, ``evoray: error: ...``, and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

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
    """Build a task, load the model, and measure its loss on the targets (until `evolve` lands)."""
    import torch

    from evoray.data import collate, encode_pairs, read_records
    from evoray.models import count_parameters, load_model
    from evoray.tasks import write_task

    t0 = time.perf_counter()
    paths = write_task(args.task, args.out, pool_size=args.pool_size, generator=args.generator,
                       seed=args.seed)
    print(f"[demo] task {args.task!r}: wrote {', '.join(paths)} under {args.out} "
          f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"[demo] model {args.model!r}: {count_parameters(model) / 1e6:.1f} M parameters, "
          f"vocabulary {len(tok)}, loaded in {time.perf_counter() - t0:.1f} s")
    import ray

    from evoray.data import read_dataset
    from evoray.ray_utils import init_ray

    t0 = time.perf_counter()
    init_ray(num_cpus=args.num_cpus)
    n_pool = read_dataset(paths["pool"], "candidate", columns=["id", "prompt"]).count()
    print(f"[demo] local Ray ({args.num_cpus} CPUs): Ray Data read the pool, {n_pool} candidates "
          f"({time.perf_counter() - t0:.1f} s)")
    ray.shutdown()
    targets = read_records(paths["targets"], "target")
    encoded, _ = encode_pairs(tok, targets, max_length=args.max_length)
    losses = []
    with torch.inference_mode():
        for i in range(0, len(encoded), 8):
            batch = collate(encoded[i:i + 8], tok.pad_token_id)
            losses.append(model(**batch).loss.item())
    n_resp = sum(e.n_response_tokens for e in encoded)
    print(f"[demo] {len(targets)} targets tokenized: {n_resp} response tokens carry labels; "
          f"mean response loss of the base model {sum(losses) / len(losses):.3f} nats")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evoray", description=__doc__.splitlines()[0] + (
        " EvoSelect: generate -> select -> train, on Ray."))
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

    demo = sub.add_parser("demo", help="build a task and load the default model")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--task", default="arithmetic")
    demo.add_argument("--generator", choices=("weak", "strong"), default="weak")
    demo.add_argument("--pool-size", type=int, default=500)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-length", type=int, default=256)
    demo.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)

    from evoray.features.cli import register as register_features

    register_features(sub)

    from evoray.select.cli import register as register_select

    register_select(sub)
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
