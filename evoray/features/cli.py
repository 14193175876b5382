"""``evoray features``: per-sample gradient features of a pool (or of the targets)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "features", help="compute projected LoRA-gradient features of a pool on Ray Data",
        description="Compute per-sample LoRA-gradient features (LESS-style, batched) of every "
        "record of --pool, on Ray Data actors, and write a features folder (Parquet + meta.json). "
        "Settings come from the `features` section of --config and `features.key=value` "
        "overrides; features already computed for the same inputs and settings are reused.")
    p.add_argument("--pool", required=True, help="JSONL or Parquet records (path or URI)")
    p.add_argument("--out", help="output folder (default: <pool>.features)")
    p.add_argument("--model", help="base model (default: the config's `model`)")
    p.add_argument("--adapter", help="LoRA adapter folder of the proxy (default: a fresh LoRA)")
    p.add_argument("--adam-state", help="Adam moments to precondition candidates with")
    p.add_argument("--kind", choices=("candidate", "target"), default="candidate",
                   help="record kind of --pool (targets: never Adam-preconditioned)")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--address", help="Ray cluster to join (default: the one this job runs in, "
                   "or a new local Ray)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. features.batch_size=32")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import time

    from evoray.config import load_config
    from evoray.data.features import read_features_meta
    from evoray.features.stage import featurize
    from evoray.ray_utils import init_ray

    cfg = load_config(args.config, args.overrides)
    if cfg.trust_remote_code:
        from evoray.models import allow_remote_code

        allow_remote_code()
    model = args.model or cfg.model
    t0 = time.perf_counter()
    started = init_ray(address=args.address, quiet=args.no_progress)
    try:
        out = featurize(args.pool, model, args.adapter, cfg.features, out=args.out,
                        kind=args.kind, adam_state=args.adam_state, cache_dir=cfg.cache_dir,
                        progress=not args.no_progress)
    finally:
        if started:
            import ray

            ray.shutdown()
    meta = read_features_meta(out)
    skipped = f"; {meta['skipped']} skipped" if meta.get("skipped") else ""
    print(f"features: {meta['count']} x {meta['dim']} ({meta['dtype']}) of {model} in {out}"
          f"{skipped} ({time.perf_counter() - t0:.1f} s; projection peak "
          f"{meta['projection_peak_mb']} MB)")
    return 0
