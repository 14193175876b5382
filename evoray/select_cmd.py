"""``evoray select``: a selection from features, or from record files in one command.

``--features``/``--targets`` name feature folders (``evoray features``) and the selection runs at
once. Without ``--features``, ``--pool`` and ``--targets`` are record files and ``--model`` the
proxy's base model: the features of both are computed first (Ray Data, the ``features`` settings
of ``--config`` and ``features.key=value`` overrides) and cached under ``OUT/features/``, where a
rerun with the same inputs and settings reuses them. Either way ``OUT`` receives
``selected.parquet``, ``scores.parquet``, ``summary.json`` and, with ``--pool``,
``selected.jsonl``."""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``select`` subcommand to the ``evoray`` parser."""
    p = subparsers.add_parser("select", help="select a budget of candidates, from their features "
                              "or straight from record files")
    p.add_argument("--features", help="candidate features (folder or Parquet); without it, "
                   "--pool and --targets are record files and their features are computed")
    p.add_argument("--targets", required=True, help="target features (folder or Parquet), or "
                   "target records without --features")
    p.add_argument("--model", help="records mode: the proxy's base model (default: the "
                   "config's `model`)")
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
    p.add_argument("overrides", nargs="*", metavar="section.KEY=VALUE",
                   help="select (and, in records mode, features) settings, e.g. "
                        "select.evoselect.novelty=knn features.batch_size=32 (as `evoray "
                        "config` lists them)")
    p.add_argument("--pool", help="candidate pool file: also write OUT/selected.jsonl, the "
                                  "selected records joined on id, in rank order")
    p.add_argument("--dtype", choices=("float32", "float16"),
                   help="read features as this type (default: as stored)")
    p.set_defaults(func=_cmd_select)


def _config(args: argparse.Namespace):
    """The job config of ``--config`` (or the defaults) with the positional overrides, and its
    ``select`` section with the flags applied."""
    from evoray.config import ConfigError, load_config

    if args.param:
        raise ConfigError(f"--param is gone: give select.<method>.<key>=<value> after the options, "
                          f"e.g. select.evoselect.{args.param[0]}")
    allowed = ("select.",) if args.features else ("select.", "features.", "model=")
    outside = [o for o in args.overrides if not o.startswith(allowed)]
    if outside:
        raise ConfigError(f"override {outside[0]!r}: evoray select takes "
                          + ("select.KEY=VALUE" if args.features else
                             "select.KEY=VALUE, features.KEY=VALUE, model=NAME") + " only")
    cfg = load_config(args.config, args.overrides)
    given = {name: getattr(args, name) for name in
             ("method", "ratio", "k", "lam", "blocks", "eps", "tau", "seed")
             if getattr(args, name) is not None}
    if "ratio" in given:
        given["k"] = None
    return cfg, dataclasses.replace(cfg.select, **given)


def _features(cfg, args: argparse.Namespace) -> tuple[str, str]:
    """Records mode: the features of ``--pool`` and ``--targets`` under ``OUT/features/``
    (computed, or reused when their inputs and settings match)."""
    from evoray.config import ConfigError
    from evoray.data import detect_format
    from evoray.ray_utils import init_ray
    from evoray.stages import featurize_round

    if not args.pool:
        raise ConfigError("evoray select: give --features (a features folder) or --pool and "
                          "--targets as record files, whose features are then computed")
    if _is_features(args.targets):
        raise ConfigError(f"--targets {args.targets}: features (a folder or Parquet with a "
                          "'feature' column); give the pool's features with --features too, or "
                          "give target records")
    detect_format(args.pool)
    detect_format(args.targets)
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    if cfg.trust_remote_code:
        from evoray.models import allow_remote_code

        allow_remote_code()
    out = args.out.rstrip("/")
    fpool, ftargets = f"{out}/features/pool", f"{out}/features/targets"
    print(f"[select] features of {args.pool} and {args.targets} with {cfg.model} -> "
          f"{out}/features", flush=True)
    started = init_ray()  # one local Ray for both featurize calls
    try:
        featurize_round(cfg, args.pool, args.targets, fpool, ftargets)
    finally:
        if started:
            import ray

            ray.shutdown()
    return fpool, ftargets


def _is_features(path: str) -> bool:
    """A features folder (``meta.json``) or a Parquet file with a ``feature`` column."""
    from evoray.storage import exists, resolve

    if exists(f"{path.rstrip('/')}/meta.json"):
        return True
    if not path.endswith(".parquet") or not exists(path):
        return False
    import pyarrow.parquet as pq

    fs, p = resolve(path)
    return "feature" in pq.read_schema(p, filesystem=fs).names


def _cmd_select(args: argparse.Namespace) -> int:
    from evoray.select.io import select_files

    cfg, sel = _config(args)
    features, targets = args.features, args.targets
    if features is None:
        features, targets = _features(cfg, args)
    summary, _, feats = select_files(sel, features, targets, args.out, pool=args.pool,
                                     dtype=args.dtype)
    line = f"{sel.method}: selected {summary['selected']} of {len(feats)} candidates -> " \
           f"{args.out}/selected.parquet"
    if args.pool:
        line += f", {summary['records']} records -> {args.out}/selected.jsonl"
    print(line)
    return 0
