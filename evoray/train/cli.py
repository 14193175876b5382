"""``evoray train``, ``evoray eval`` and ``evoray export``."""

from __future__ import annotations

import argparse
import time

from evoray.config import TrainConfig


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``train`` section of ``--config`` (or the defaults), then the positional
    ``train.key=value`` overrides."""
    from evoray.config import ConfigError, load_config

    if args.set is not None:
        example = args.set[0] if args.set else "lr=1e-3"
        raise ConfigError(f"--set is gone: give train.KEY=VALUE after the options, e.g. "
                          f"train.{example}")
    outside = [o for o in args.overrides if not o.startswith("train.")]
    if outside:
        raise ConfigError(f"override {outside[0]!r}: evoray train takes train.KEY=VALUE only")
    return load_config(args.config, args.overrides).train


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _cmd_train(args: argparse.Namespace) -> int:
    from evoray.train import train

    cfg = _train_config(args)
    print(f"[train] {args.model} on {args.data}: {cfg.num_workers} worker(s), "
          f"{'max_steps=' + str(cfg.max_steps) if cfg.max_steps else f'{cfg.epochs} epoch(s)'}",
          flush=True)
    t0 = time.perf_counter()
    res = train(args.data, args.model, args.adapter, cfg, out=args.out, name=args.name,
                progress=True)
    hist = res.history
    _table([("examples", f"{res.n_examples} ({len(res.skipped)} skipped)"),
            ("steps", str(res.metrics.get("step"))),
            ("loss first -> last", f"{hist[0]:.4f} -> {hist[-1]:.4f}" if hist else "-"),
            ("resumed from step", str(res.metrics.get("resumed_from_step"))),
            ("time", f"{time.perf_counter() - t0:.1f} s"),
            ("adapter", res.adapter), ("adam state", res.adam_state)])
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from evoray.train.evaluate import evaluate

    print(f"[eval] {args.model}{' + ' + args.adapter if args.adapter else ''} on {args.test}",
          flush=True)
    m = evaluate(args.model, args.adapter, args.test, batch_size=args.batch_size,
                 max_length=args.max_length, device=args.device, num_actors=args.actors,
                 num_gpus=1.0 if args.device.startswith("cuda") and args.actors else 0.0)
    rows = [("accuracy", f"{m['accuracy']:.4f} ({m['n']} items)"),
            ("response loss", f"{m['loss']:.4f} nats")]
    rows += [(f"  {k}", f"{v['accuracy']:.4f} ({v['n']})") for k, v in m["per_subtask"].items()]
    _table(rows)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from evoray.train.export import export

    out = export(args.adapter, args.out, merge=args.merge, model_spec=args.model)
    print(f"[export] {'merged model' if args.merge else 'adapter'} written to {out}")
    return 0


def register(sub) -> None:
    """Add the ``train``, ``eval`` and ``export`` commands to the ``evoray`` sub-parsers."""
    p = sub.add_parser("train", help="LoRA fine-tuning on Ray Train")
    p.add_argument("--data", required=True, help="records to train on (path or URI): candidates, "
                   "or targets (their prompt and response)")
    p.add_argument("--model", required=True, help="base model spec")
    p.add_argument("--adapter", help="continue this adapter (default: a fresh LoRA)")
    p.add_argument("--out", required=True, help="output folder for the adapter (path or URI)")
    p.add_argument("--name", help="Ray Train run name; reuse it to resume a run")
    p.add_argument("--config", help="YAML job config whose `train` section is used")
    p.add_argument("--set", nargs="*", help=argparse.SUPPRESS)  # gone: train.KEY=VALUE
    p.add_argument("overrides", nargs="*", metavar="train.KEY=VALUE",
                   help="train settings, e.g. train.lr=1e-3 train.num_workers=2 (as `evoray "
                        "config` lists them)")
    p.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="MCQ accuracy and response loss on a test file")
    e.add_argument("--model", required=True, help="base model spec")
    e.add_argument("--adapter", help="adapter folder (default: the base model alone)")
    e.add_argument("--test", required=True, help="MCQ records (path or URI)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-length", type=int, default=512)
    e.add_argument("--device", default="cpu")
    e.add_argument("--actors", type=int, default=0,
                   help="0 = score in this process; N = a Ray Data stage of N actors (large sets; "
                        "one GPU each with --device cuda)")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="write a merged model folder, or the adapter alone")
    x.add_argument("--adapter", required=True, help="adapter folder")
    x.add_argument("--merge", action="store_true", help="merge LoRA into the base weights")
    x.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    x.add_argument("--out", required=True, help="output folder (path or URI)")
    x.set_defaults(func=_cmd_export)
