"""What a sweep writes when it ends: ``results.csv``, ``epochs.csv``, ``summary.md`` with plots,
and ``best_config.yaml``.

* ``results.csv``: one row per trial: ``trial_id``, ``status`` (``done``; ``stopped``: ASHA ended
  it before its last epoch; ``error``), the swept parameters, each trial's effective ``method``,
  ``ratio``, ``lam`` and ``epochs``, ``epochs_run``, the last reported metrics (dev and test
  accuracy and loss, training loss, selection size and make-up), ``time_s`` and ``checkpoint``
  (the adapter of the last reported epoch).
* ``epochs.csv``: every report (trial × epoch), as the scheduler saw them.
* ``summary.md``: the best config per method; tables of dev accuracy with λ (``select.lam``,
  EvoSelect trials) as rows and ratio as columns, and of method × ratio when methods vary, each
  followed by the same table of test accuracy. A cell holds the trial its cell would choose:
  the best by the sweep's dev metric among the trials that share that (λ, ratio), whatever else
  varies; its test accuracy is that trial's.
* ``plots/``: accuracy against ratio (one line per λ, or per method) and the trade-off curve
  (accuracy against λ, one line per ratio), drawn on ``matplotlib.figure.Figure`` with the Agg
  canvas, no pyplot state.
* ``best_config.yaml``: the best trial's full config (``evolve.run_dir`` set to
  ``sweep_dir/best_run``), ready for ``evoray evolve``.

Trials are ranked by the sweep's metric on dev only; test numbers are never used to choose.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evoray.config import Config, apply_override, dump_config
from evoray.storage import atomic_write_bytes

__all__ = ["collect", "write_outputs", "best_row", "pivot", "pivot_table"]

METRICS = ("dev_accuracy", "dev_loss", "test_accuracy", "test_loss", "train_loss", "selected",
           "pool", "picked_clean", "picked_wrong_label", "picked_off_task",
           "picked_near_duplicate", "select_s", "train_s", "eval_s")
EPOCH_COLUMNS = ("trial_id", "epoch", "dev_accuracy", "dev_loss", "test_accuracy",
                 "test_loss", "train_loss", "time_total_s")


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect(grid, cfg: Config, space: dict, finished: set[str]) -> tuple[list[dict], list[dict]]:
    """Rows of ``results.csv`` and ``epochs.csv`` from Tune's ``ResultGrid``. ``finished``: the
    ids of trials that ended (terminated or errored) in the saved experiment state; the others
    are ``unfinished`` (the driver stopped first)."""
    rows, epochs = [], []
    for res in grid:
        m = dict(res.metrics or {})
        params = {k: res.config.get(k) for k in space}
        tcfg = cfg
        for key, value in params.items():
            tcfg = apply_override(tcfg, key, value)
        found = re.search(r"trial_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})", os.path.basename(str(res.path)))
        tid = m.get("trial_id") or (found.group(1) if found else str(res.path))
        run = int(m.get("epoch") or 0)
        status = ("error" if res.error else "unfinished" if tid not in finished else
                  "stopped" if run < tcfg.train.epochs else "done")
        rows.append({"trial_id": tid, "status": status, **params,
                     "method": tcfg.select.method, "ratio": tcfg.select.ratio,
                     "lam": tcfg.select.lam, "epochs": tcfg.train.epochs, "epochs_run": run,
                     **{k: m.get(k) for k in METRICS}, "time_s": m.get("time_total_s"),
                     "checkpoint": res.checkpoint.path if res.checkpoint else
                     m.get("checkpoint_path"),
                     "error": str(res.error).splitlines()[0][:300] if res.error else ""})
        df = res.metrics_dataframe
        if df is not None and len(df):
            # A trial cut off by a stopped driver may report an epoch again after --resume
            # (it restarts from its last checkpoint, or afresh): keep each epoch's last report.
            last = {}
            for rec in df.to_dict("records"):
                last[rec.get("epoch")] = {k: rec.get(k, tid if k == "trial_id" else None)
                                          for k in EPOCH_COLUMNS}
            epochs.extend(last.values())
    return sorted(rows, key=lambda r: r["trial_id"]), epochs


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The row with the best finite ``metric`` (ties: the first trial id)."""
    scored = [r for r in rows if _num(r.get(metric)) is not None]
    if not scored:
        return None
    sign = -1 if mode == "max" else 1
    return min(scored, key=lambda r: (sign * _num(r[metric]), r["trial_id"]))


def pivot(rows: list[dict], row_key: str, col_key: str, metric: str,
          mode: str) -> tuple[list, list, dict]:
    """``(row values, column values, {(row, col): best row of the cell})``."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r[row_key], r[col_key]), []).append(r)
    picked = {k: best_row(v, metric, mode) for k, v in cells.items()}
    picked = {k: v for k, v in picked.items() if v is not None}
    return (sorted({k[0] for k in picked}, key=str if row_key == "method" else float),
            sorted({k[1] for k in picked}), picked)


def pivot_table(rows: list[dict], row_key: str, col_key: str, value: str, metric: str,
                mode: str, corner: str) -> list[str]:
    """A Markdown table of ``value`` (e.g. dev_accuracy) by (row, column), ``-`` when empty."""
    rv, cv, cells = pivot(rows, row_key, col_key, metric, mode)
    lines = [f"| {corner} | " + " | ".join(f"{c:g}" for c in cv) + " |",
             "| --- |" + " ---: |" * len(cv)]
    for r in rv:
        vals = [_num(cells[(r, c)].get(value)) if (r, c) in cells else None for c in cv]
        lines.append(f"| {r if isinstance(r, str) else f'{r:g}'} | " + " | ".join(
            "-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return lines


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _lines_plot(series: dict[str, dict], xlabel: str, title: str, metric: str, mode: str,
                log_x: bool) -> bytes:
    """Two panels (dev, test accuracy); ``series`` maps a label to its rows, x = ``xlabel``."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, value in zip(axes, ("dev_accuracy", "test_accuracy"), strict=True):
        for label, (rows, x_key) in series.items():
            by_x: dict = {}
            for r in rows:
                by_x.setdefault(r[x_key], []).append(r)
            xs = sorted(by_x)
            ys = [_num((best_row(by_x[x], metric, mode) or {}).get(value)) for x in xs]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ticks = sorted({r[x_key] for rows, x_key in series.values() for r in rows})
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_title(f"{value.replace('_', ' ')} ({title})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    return _png(fig)


def _best_per_method(rows: list[dict], space: dict, metric: str, mode: str) -> list[str]:
    lines = ["| method | trial | parameters | epochs run | dev accuracy | test accuracy |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for method in sorted({r["method"] for r in rows}):
        b = best_row([r for r in rows if r["method"] == method], metric, mode)
        if b is None:
            continue
        params = ", ".join(f"{k}={b[k]}" for k in space if k != "select.method")
        acc = [_num(b.get(k)) for k in ("dev_accuracy", "test_accuracy")]
        lines.append(f"| {method} | {b['trial_id']} | {params} | {b['epochs_run']} | " +
                     " | ".join("-" if a is None else f"{a:.3f}" for a in acc) + " |")
    return lines


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue().encode()


def write_outputs(cfg: Config, space: dict, rows: list[dict], epochs: list[dict], *,
                  seconds: float, resumed: bool = False) -> dict:
    """Write every file listed in the module docstring under ``cfg.sweep.sweep_dir``; return
    their paths and ``best`` (the best row)."""
    root, sw = cfg.sweep.sweep_dir, cfg.sweep
    files = {name: f"{root}/{name}" for name in ("results.csv", "epochs.csv", "summary.md",
                                                 "best_config.yaml")}
    columns = ["trial_id", "status", *[k for k in space if k not in
                                       ("select.method", "select.ratio", "select.lam",
                                        "train.epochs")],
               "method", "ratio", "lam", "epochs", "epochs_run", *METRICS, "time_s", "checkpoint",
               "error"]
    atomic_write_bytes(files["results.csv"], _csv(rows, columns))
    atomic_write_bytes(files["epochs.csv"], _csv(epochs, list(EPOCH_COLUMNS)))
    best = best_row(rows, sw.metric, sw.mode)
    if best is None:
        from evoray.errors import EvorayError

        first = next((r["error"] for r in rows if r["error"]), "no metric reported")
        raise EvorayError(f"no trial of the sweep reported {sw.metric} (first error: {first}); "
                          f"see {files['results.csv']}")
    best_cfg = apply_override(cfg, "evolve.run_dir", f"{root}/best_run")
    for key in space:
        best_cfg = apply_override(best_cfg, key, best[key])
    atomic_write_bytes(files["best_config.yaml"], (
        f"# Best trial {best['trial_id']} of the sweep in {root}: {sw.metric} "
        f"{_num(best[sw.metric]):.4f} (dev), test accuracy "
        f"{_num(best.get('test_accuracy')) or float('nan'):.4f} (reported, not used to choose)."
        f"\n# Run it with: evoray evolve {files['best_config.yaml']}\n"
        + dump_config(best_cfg)).encode())
    status = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error")}
    md = [f"# Sweep: {root}", "",
          f"Model `{cfg.model}`, task `{cfg.evolve.task}`, pool {best.get('pool')} candidates "
          f"({cfg.generate.kind}/{cfg.generate.preset}), features dim "
          f"{cfg.features.dim or 'default (1024 on CPU, 8192 on GPU)'}; "
          f"{len(rows)} trials ({status['done']} done, {status['stopped']} stopped early by "
          f"{sw.scheduler.upper()}, {status['error']} failed) over {', '.join(space)}; "
          f"{sw.search} search. Trials ranked by **{sw.metric}** ({sw.mode}) on the dev split "
          f"(the last reported epoch); test accuracy is reported beside it, never used to "
          f"choose. Wall time {seconds:.0f} s{' (this run, after --resume)' if resumed else ''}.",
          "", f"Best trial (ties: the first trial id): {best['trial_id']} ("
          f"{', '.join(f'{k}={best[k]}' for k in space)}), "
          f"dev accuracy {_num(best.get('dev_accuracy')) or float('nan'):.3f}, test accuracy "
          f"{_num(best.get('test_accuracy')) or float('nan'):.3f} → `best_config.yaml`; its "
          f"adapter: `{best.get('checkpoint') or '-'}`.", "",
          "## Best config per method", "", *_best_per_method(rows, space, sw.metric, sw.mode)]
    plots = {}
    evo = [r for r in rows if r["method"] == "evoselect"]
    if evo:
        for value, name in (("dev_accuracy", "Dev"), ("test_accuracy", "Test")):
            md += ["", f"## {name} accuracy: λ (rows) × ratio (columns), EvoSelect", "",
                   *pivot_table(evo, "lam", "ratio", value, sw.metric, sw.mode, "λ \\ ratio")]
    methods = sorted({r["method"] for r in rows})
    if len(methods) > 1:
        for value, name in (("dev_accuracy", "Dev"), ("test_accuracy", "Test")):
            md += ["", f"## {name} accuracy: method × ratio", "",
                   *pivot_table(rows, "method", "ratio", value, sw.metric, sw.mode,
                                "method \\ ratio")]
    series = {f"evoselect λ={lam:g}": ([r for r in evo if r["lam"] == lam], "ratio")
              for lam in sorted({r["lam"] for r in evo})}
    series.update({m: ([r for r in rows if r["method"] == m], "ratio")
                   for m in methods if m != "evoselect"})
    if len({r["ratio"] for r in rows}) > 1:
        plots["accuracy_vs_ratio"] = _lines_plot(series, "selection ratio",
                                                 "best per point", sw.metric, sw.mode, True)
    if len({r["lam"] for r in evo}) > 1:
        plots["tradeoff"] = _lines_plot(
            {f"ratio {ratio:g}": ([r for r in evo if r["ratio"] == ratio], "lam")
             for ratio in sorted({r["ratio"] for r in evo})},
            "λ (0 = pure OT alignment, 1 = pure diversity)", "EvoSelect", sw.metric, sw.mode,
            False)
    if plots:
        md += ["", "## Plots", ""]
    for name, png in plots.items():
        files[name] = f"{root}/plots/{name}.png"
        atomic_write_bytes(files[name], png)
        md.append(f"![{name}](plots/{name}.png)")
    md += ["", "All trials: `results.csv`; every reported epoch: `epochs.csv`.", ""]
    atomic_write_bytes(files["summary.md"], "\n".join(md).encode())
    files = {k.split(".")[0]: v for k, v in files.items()}
    return {**files, "best": best}
