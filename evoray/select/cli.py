"""``evoray select``: features in, ``selected.parquet`` + ``summary.json`` out."""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``select`` subcommand to the ``evoray`` parser."""
    p = subparsers.add_parser("select", help="select a budget of candidates from their features")
    p.add_argument("--features", required=True, help="candidate features (folder or Parquet)")
    p.add_argument("--targets", required=True, help="target features (folder or Parquet)")
    p.add_argument("--out", required=True, help="output folder (path or URI)")
    p.add_argument("--method", help="evoselect (default), random, attribution, diversity, "
                                     "attr_div, tsds")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="budget as a share of the pool, in (0, 1]")
    budget.add_argument("--k", type=int, help="budget as a count")
    p.add_argument("--lam", type=float, help="EvoSelect: 0 = pure alignment, 1 = pure diversity")
    p.add_argument("--blocks", type=int, help="EvoSelect blocks")
    p.add_argument("--eps", type=float, help="EvoSelect OT entropic regularisation")
    p.add_argument("--tau", type=float, help="EvoSelect OT KL penalty")
    p.add_argument("--seed", type=int)
    p.add_argument("--param", action="append", default=[], help=argparse.SUPPRESS)  # gone
    p.add_argument("--config", help="job YAML whose `select` section gives the defaults")
    p.add_argument("overrides", nargs="*", metavar="select.KEY=VALUE",
                   help="select settings, e.g. select.evoselect.novelty=knn select.tsds.kde_K=500 "
                        "(as `evoray config` lists them)")
    p.add_argument("--pool", help="candidate pool file: also write OUT/selected.jsonl, the "
                                  "selected records joined on id, in rank order")
    p.add_argument("--dtype", choices=("float32", "float16"),
                   help="read features as this type (default: as stored)")
    p.set_defaults(func=_cmd_select)


def _config(args: argparse.Namespace):
    """The ``select`` section of ``--config`` (or the defaults), then the positional
    ``select.key=value`` overrides, then the flags."""
    from evoray.config import ConfigError, load_config

    if args.param:
        raise ConfigError(f"--param is gone: give select.<method>.<key>=<value> after the options, "
                          f"e.g. select.evoselect.{args.param[0]}")
    outside = [o for o in args.overrides if not o.startswith("select.")]
    if outside:
        raise ConfigError(f"override {outside[0]!r}: evoray select takes select.KEY=VALUE only")
    cfg = load_config(args.config, args.overrides).select
    given = {name: getattr(args, name) for name in
             ("method", "ratio", "k", "lam", "blocks", "eps", "tau", "seed")
             if getattr(args, name) is not None}
    if "ratio" in given:
        given["k"] = None
    return dataclasses.replace(cfg, **given)


def _cmd_select(args: argparse.Namespace) -> int:
    from evoray.select.io import select_files

    cfg = _config(args)
    summary, _, feats = select_files(cfg, args.features, args.targets, args.out, pool=args.pool,
                                     dtype=args.dtype)
    line = f"{cfg.method}: selected {summary['selected']} of {len(feats)} candidates -> " \
           f"{args.out}/selected.parquet"
    if args.pool:
        line += f", {summary['records']} records -> {args.out}/selected.jsonl"
    print(line)
    return 0
