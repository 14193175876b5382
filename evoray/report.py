"""``evoray report RUN_DIR``: a Markdown summary of an evolve run, with PNG plots.

Reads what the round loop wrote (``manifest.json``, ``base/metrics.json``, ``round_NN/...``) and
writes ``report.md`` and ``plots/*.png`` beside it (or under ``out``). Paths may be local or
pyarrow URIs (``s3://``...): files are read through :func:`evoray.storage.resolve` and written with
:func:`evoray.storage.atomic_write_bytes`; figures are drawn on ``matplotlib.figure.Figure`` with
the Agg canvas and rendered to memory, so no pyplot state is shared between calls.

A round still running, or stopped, gets a row naming its first missing stage; the report never
needs a finished run. The PCA plot projects unit-normalised features (cosine geometry, as the
selectors see them) on their top two principal axes, found by a seeded randomised SVD in numpy
(Halko, Martinsson & Tropp 2011, algorithm 4.4).
"""

from __future__ import annotations

import argparse
import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from evoray.data.features import read_features
from evoray.report_run import RoundInfo, RunInfo, file_type, join, load_run, read_json
from evoray.storage import atomic_write_bytes, resolve
from evoray.tasks import KINDS as MIX_KINDS

__all__ = ["round_table", "write_report", "main_score", "pca2", "SCORE_COLUMNS", "register"]

# The score each selector ranks by, and what it means (captions). Methods without one (random)
# fall back to a "score" column, then to the first float column of scores.parquet.
SCORE_COLUMNS = {
    "evoselect": ("alignment", "OT mass each candidate gets from the targets in the first block"),
    "tsds": ("probability", "TSDS sampling probability"),
    "attribution": ("attribution", "cosine to the nearest target-subtask mean gradient"),
    "attr_div": ("attribution", "cosine to the nearest target-subtask mean gradient"),
    "diversity": ("centroid_cos", "cosine to its k-means centroid"),
}
KIND_COLORS = {"clean": "#2ca02c", "wrong_label": "#d62728", "off_task": "#ff7f0e",
               "near_duplicate": "#9467bd"}
MAX_CANDIDATES = 3000  # PCA points per round: enough to see the shape, cheap to draw
MAX_TARGETS = 2000


def _mix_kinds(run: RunInfo) -> list[str]:
    kinds = {k for r in run.rounds for mix in (r.mix, r.pool_mix) if mix for k in mix}
    return [k for k in MIX_KINDS if k in kinds] + sorted(kinds - set(MIX_KINDS))


def _num(m: dict | None, key: str, fmt: str) -> str:
    value = (m or {}).get(key)
    return "–" if value is None else format(value, fmt)


def round_table(run: RunInfo) -> list[str]:
    """The per-round Markdown table: one row per round, the base model as round 0."""
    kinds = _mix_kinds(run)
    head = ["round", "accuracy", "loss", "proxy acc.", "proxy AUC", "n_generated", "n_clean",
            "n_selected", *(f"{k} %" for k in kinds), "time (s)", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for r in run.rounds:
        m = r.metrics
        cells = ["0 (base)" if r.round == 0 else str(r.round), _num(m, "accuracy", ".4f"),
                 _num(m, "loss", ".4f"), _num(r.proxy, "accuracy", ".3f"),
                 _num(r.proxy, "auc", ".3f") + (" (chance)" if (r.proxy or {}).get("at_chance")
                                                else "")]
        cells += ["–" if r.round == 0 else str(r.counts.get(k, "–"))
                  for k in ("n_generated", "n_clean", "n_selected")]
        for k in kinds:
            sel = f"{r.mix.get(k, 0.0):.1%}" if r.mix else "–"
            cells.append(sel + (f" ({r.pool_mix.get(k, 0.0):.1%})" if r.pool_mix else ""))
        seconds = (m or {}).get("seconds") or {}
        cells += [f"{sum(seconds.values()):.1f}" if seconds else "–",
                  r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main_score(columns: list[str], float_columns: list[str], method: str) -> str | None:
    """The column of ``scores.parquet`` that shows what ``method`` ranks by (None if none)."""
    preferred = SCORE_COLUMNS.get(method, (None, ""))[0]
    for name in (preferred, "score"):
        if name in columns and name in float_columns:
            return name
    return next(iter(float_columns), None)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _panels(n: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _plot_accuracy(run: RunInfo) -> bytes | None:
    pts = [(r.round, r.metrics["accuracy"]) for r in run.rounds
           if r.metrics and r.metrics.get("accuracy") is not None]
    if not pts:
        return None
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    x, y = zip(*pts, strict=True)
    ax.plot(x, y, "o-", color="#1f77b4")
    if x[0] == 0:
        ax.axhline(y[0], color="grey", ls="--", lw=1, label="base model")
        ax.legend(loc="best")
    for xi, yi in pts:
        ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    ax.set_xticks(list(x))
    ax.margins(y=0.15)
    ax.set(xlabel="round (0 = base model)", ylabel="test accuracy", title="Accuracy per round")
    return _png(fig)


def _scores(r: RoundInfo) -> tuple[pa.Table, list[str]] | None:
    """A round's ``scores.parquet`` and the names of its float columns (None if absent)."""
    path = join(r.path, "selection", "scores.parquet")
    if file_type(path) != pafs.FileType.File:
        return None
    fs, p = resolve(path)
    table = pq.read_table(p, filesystem=fs)
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    return table, floats


def _plot_scores(run: RunInfo) -> tuple[bytes, str] | None:
    """Histograms of the main score, selected vs rejected; returns the PNG and the caption."""
    panels = []
    for r in run.rounds:
        got = _scores(r) if r.round > 0 else None
        if got is None:
            continue
        table, floats = got
        method = (read_json(join(r.path, "selection", "summary.json")) or {}).get("method",
                                                                               run.method)
        col = main_score(table.column_names, floats, method)
        if col is not None and "selected" in table.column_names:
            panels.append((r.round, method, col, table[col].to_numpy(zero_copy_only=False),
                           table["selected"].to_numpy(zero_copy_only=False).astype(bool)))
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (rnd, _, col, values, selected) in zip(axes, panels, strict=True):
        ok = np.isfinite(values)
        v = values[ok].astype(np.float64)
        log = v.size > 0 and v.min() > 0 and v.max() / v.min() > 1e3  # e.g. OT mass
        bins = (np.geomspace(v.min(), v.max(), 41) if log else
                np.histogram_bin_edges(v, bins=40) if v.size else 40)
        for mask, label, color in ((~selected, "rejected", "#999999"),
                                   (selected, "selected", "#d62728")):
            part = values[ok & mask]
            if part.size:
                ax.hist(part, bins=bins, density=True, alpha=0.6, color=color,
                        label=f"{label} ({part.size})")
        if log:
            ax.set_xscale("log")
        ax.set(title=f"round {rnd}", xlabel=col, ylabel="density")
        ax.legend(fontsize=8)
    about = []
    for method, col in sorted({(m, c) for _, m, c, _, _ in panels}):
        known, meaning = SCORE_COLUMNS.get(method, (None, ""))
        about.append(f"`{col}` ({method or 'unknown method'}"
                     + (f": {meaning})" if known == col else ")"))
    return _png(fig), (f"Score of the selected vs the rejected candidates, per round (densities; "
                       f"candidate counts in the legend): {'; '.join(about)}.")


def _plot_mix(run: RunInfo) -> bytes | None:
    rounds = [r for r in run.rounds if r.round > 0 and (r.mix or r.pool_mix)]
    if not rounds:
        return None
    kinds = _mix_kinds(run)
    spare = itertools.cycle(("C0", "C5", "C6", "C7", "C8", "C9"))  # not the kinds' colours
    colors = {k: KIND_COLORS.get(k) or next(spare) for k in kinds}
    fig = Figure(figsize=(max(5.0, 1.6 * len(rounds) + 2.5), 3.8), layout="constrained")
    ax = fig.subplots()
    ticks, labels = [], []
    for i, r in enumerate(rounds):
        for dx, mix, name in ((-0.21, r.pool_mix, "pool"), (0.21, r.mix, "sel.")):
            if not mix:
                continue
            bottom = 0.0
            for k in kinds:
                share = mix.get(k, 0.0)
                ax.bar(i + dx, share, 0.38, bottom=bottom, color=colors[k], edgecolor="white",
                       lw=0.5)
                bottom += share
            ticks.append(i + dx)
            labels.append(f"{name}\nround {r.round}")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set(ylabel="share", ylim=(0, 1.0), title="Make-up by meta.kind: pool vs selection")
    ax.legend(handles=[Patch(color=colors[k], label=k) for k in kinds], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float32)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norm > 0, norm, 1.0)


def pca2(X: np.ndarray, *, seed: int = 0, n_iter: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Project the rows of ``X`` (n, d) on their top two principal axes.

    Randomised SVD with 10 extra columns and ``n_iter`` power iterations, so a (6000, 8192) input
    costs a few matrix products rather than a full SVD.

    Returns:
        ``(P, share)``: (n, 2) coordinates and (2,) shares of the total variance.
    """
    X = X - X.mean(axis=0)
    total = float(np.square(X, dtype=np.float64).sum()) or 1.0
    k = min(12, *X.shape)
    Q = X @ np.random.default_rng(seed).standard_normal((X.shape[1], k)).astype(X.dtype)
    for _ in range(n_iter):
        Q = X @ (X.T @ np.linalg.qr(Q)[0])
    _, s, vt = np.linalg.svd(np.linalg.qr(Q)[0].T @ X, full_matrices=False)
    P = np.zeros((len(X), 2), np.float32)
    P[:, :min(2, len(s))] = X @ vt[:2].T
    share = np.zeros(2)
    share[:min(2, len(s))] = s[:2] ** 2 / total
    return P, share


def _sample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def _plot_pca(run: RunInfo) -> bytes | None:
    panels = []
    for r in run.rounds:
        pool, targets = join(r.path, "features", "pool"), join(r.path, "features", "targets")
        chosen_path = join(r.path, "selection", "selected.parquet")
        if r.round == 0 or any(file_type(p) == pafs.FileType.NotFound
                               for p in (pool, targets, chosen_path)):
            continue
        fs, p = resolve(chosen_path)
        chosen = set(pq.read_table(p, columns=["id"], filesystem=fs)["id"].to_pylist())
        G, V = read_features(pool), read_features(targets)
        rng = np.random.default_rng(r.round)
        gi, vi = _sample(len(G), MAX_CANDIDATES, rng), _sample(len(V), MAX_TARGETS, rng)
        P, share = pca2(np.concatenate([_unit_rows(G.X[gi]), _unit_rows(V.X[vi])]), seed=0)
        selected = np.array([i in chosen for i in G.ids[gi]], bool)
        panels.append((r.round, P[:len(gi)], P[len(gi):], selected, share, len(G)))
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (rnd, Pg, Pv, selected, share, n) in zip(axes, panels, strict=True):
        ax.scatter(*Pg[~selected].T, s=4, c="#bbbbbb", label=f"rejected ({(~selected).sum()})",
                   rasterized=True)
        ax.scatter(*Pv.T, s=10, c="#1f77b4", marker="x", lw=0.8, label=f"targets ({len(Pv)})")
        ax.scatter(*Pg[selected].T, s=7, c="#d62728", label=f"selected ({selected.sum()})")
        shown = f"{len(Pg)} of {n} candidates" if len(Pg) < n else f"{n} candidates"
        ax.set(title=f"round {rnd}: {shown}", xlabel=f"PC1 ({share[0]:.0%} var.)",
               ylabel=f"PC2 ({share[1]:.0%} var.)")
        ax.legend(fontsize=7, markerscale=2)
    return _png(fig)


def _config_lines(run: RunInfo) -> list[str]:
    c = run.config
    if not c:
        return ["No manifest.json (or no config in it): configuration unknown."]
    gen, sel, evo = c.get("generate", {}), c.get("select", {}), c.get("evolve", {})
    generator = str(gen.get("kind", "?"))
    if generator == "simulated":
        generator += f" ({gen.get('preset', '?')})"
    if gen.get("pool_size"):
        generator += f", {gen['pool_size']} candidates per round"
    budget = f"k = {sel['k']}" if sel.get("k") else f"ratio {sel.get('ratio', '?')}"
    rows = [("model", c.get("model", "?")), ("task", evo.get("task", gen.get("task", "?"))),
            ("generator", generator), ("method", sel.get("method", "?")), ("budget", budget),
            ("rounds", evo.get("rounds", "?"))]
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write ``report.md`` and ``plots/*.png`` for the evolve run in ``run_dir``.

    Args:
        run_dir: the run's folder (local path or URI).
        out: folder for the report (default: ``run_dir``).

    Returns:
        The path of ``report.md``.

    Raises:
        EvorayError: when ``run_dir`` is missing or holds no evolve run (see :func:`load_run`).
    """
    run = load_run(run_dir)
    return _write(run, (out or run.path).rstrip("/"))


def _write(run: RunInfo, out: str) -> str:
    lines = [f"# evoray run report: {run.path}", "", "## Configuration", "",
             *_config_lines(run), "", "## Rounds", "", *round_table(run), ""]
    if _mix_kinds(run):
        lines += ["Make-up columns: share of the selection by `meta.kind`, the cleaned pool's "
                  "share in parentheses.", ""]
    lines += ["## Plots", ""]
    scores = _plot_scores(run)
    plots = [("accuracy", _plot_accuracy(run),
              "Test accuracy per round; round 0 (dashed line) is the base model."),
             ("scores", *(scores or (None, ""))),
             ("mix", _plot_mix(run), "Make-up by `meta.kind` of the cleaned pool (left bar) and "
              "of the selection (right bar), per round."),
             ("pca", _plot_pca(run), "2-D PCA of the unit-normalised candidate and target "
              f"features, per round, with the selection highlighted (at most {MAX_CANDIDATES} "
              f"candidates and {MAX_TARGETS} targets, seeded sample).")]
    for name, png, caption in plots:
        if png is None:
            continue
        atomic_write_bytes(join(out, "plots", f"{name}.png"), png)
        lines += [f"![{name}](plots/{name}.png)", "", f"*{caption}*", ""]
    if not any(png for _, png, _ in plots):
        lines += ["No round has metrics, scores or features yet.", ""]
    path = join(out, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def _cmd_report(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    path = _write(run, (args.out or run.path).rstrip("/"))
    print(f"[report] {path}")
    print("\n".join(round_table(run)))
    return 0


def register(sub) -> None:
    """Add the ``report`` command to the ``evoray`` sub-parsers."""
    p = sub.add_parser("report", help="report.md and PNG plots of an evolve run")
    p.add_argument("run_dir", help="the run's folder (path or URI)")
    p.add_argument("--out", help="folder for report.md and plots/ (default: RUN_DIR)")
    p.set_defaults(func=_cmd_report)
