"""The quality benchmark's tables and plots (``benchmarks/quality.py`` runs the cells): the
grid's names, and the Markdown report written from the cell cache after every cell."""

from __future__ import annotations

import argparse
import json
import os
import statistics

SELECTORS = ("random", "attribution", "diversity", "attr_div", "tsds", "evoselect")
ORACLES = ("oracle_on_task", "oracle_clean")
GENERATORS = ("weak", "strong")
EVOLUTION_ARMS = ("evoselect", "attribution", "random")
TASKS = ("lookup", "arithmetic")
# EvoSelect with one setting changed from its default (the base-proxy rows at ratio 0.1 of the
# quality layer and the whole trained-proxy layer): which part of it makes it label-aware once
# the proxy can rank labels, and what each costs under the label-blind base proxy.
PROXY_ABLATIONS = {
    "evoselect previous default (center=mean, target_knn=0)":
        {"select.evoselect.center": "mean", "select.evoselect.target_knn": 0},
    "evoselect target_knn=0": {"select.evoselect.target_knn": 0},
    "evoselect target_knn=10": {"select.evoselect.target_knn": 10},
    "evoselect target_knn=40": {"select.evoselect.target_knn": 40},
    "evoselect target_mix=0.5": {"select.evoselect.target_mix": 0.5},
    "evoselect target_mix=1": {"select.evoselect.target_mix": 1.0},
    "evoselect center=mean": {"select.evoselect.center": "mean"},
    "evoselect center=none": {"select.evoselect.center": "none"},
    "evoselect alignment=lava": {"select.evoselect.alignment": "lava"},
    "evoselect blocks=1 (align once, then diversify)": {"select.blocks": 1},
    "evoselect lam=0": {"select.lam": 0.0},
    "evoselect novelty_pcs=0": {"select.evoselect.novelty_pcs": 0}}
# The trained-proxy layer only (the base proxy has no optimizer state): candidates' gradients
# preconditioned with the trained proxy's Adam moments (``features.adam``, LESS), then the method.
ADAM_ROWS = {"evoselect features.adam": "evoselect", "attribution features.adam": "attribution"}
QUALITY_METRICS = (("off_task", "off-task share"), ("duplicate", "redundant duplicate share"),
                   ("near_duplicate_kind", "near-duplicate (kind) share"),
                   ("wrong_label", "wrong-label share"), ("unique_correct", "unique-correct share"),
                   ("letter_tv", "letter TV distance to the targets"))




def _cols(args) -> list[tuple[str, float]]:
    return [(g, r) for g in args.generators for r in args.ratios]


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_table(rows: dict, task: str, gen: str, ratio: float) -> list[str]:
    """Every quality metric of every method in one cell (task, generator, ratio)."""
    pool = rows.get(f"pool|{task}|{gen}")
    if pool is None:
        return []
    lines = [f"### {task}, {gen} generator, ratio {ratio}: all metrics", "",
             "| method | " + " | ".join(t for _, t in QUALITY_METRICS) + " |",
             "|---" * (len(QUALITY_METRICS) + 1) + "|"]
    for method in SELECTORS + ORACLES:
        c = rows.get(f"quality|{task}|{gen}|{ratio}|{method}")
        if c:
            lines.append(f"| {method} | " + " | ".join(_fmt(c[k]) for k, _ in QUALITY_METRICS)
                         + " |")
    lines.append(f"| *pool (N = {pool['n']})* | {_fmt(pool['off_task'])} | – | "
                 f"{_fmt(pool['near_duplicate_kind'])} | {_fmt(pool['wrong_label'])} "
                 f"(on-task {_fmt(pool['on_task_wrong'])}) | "
                 f"{_fmt(pool['unique_correct_on_task'])} (on-task) | – |")
    return lines


def report(args, rows: dict) -> str:
    cmds: dict[str, set[str]] = {}
    for key, row in rows.items():
        cmds.setdefault(row.get("cmd", "?"), set()).add(key.split("|")[0])
    out = [f"# Quality benchmark ({'quick' if args.quick else 'full'} mode)", "",
           f"Model {args.model}, features dim {args.dim} (base model + fresh LoRA as proxy), "
           f"pools of {args.pool_size} candidates before cleaning. Every number comes from "
           f"`{os.path.basename(args.results)}` (beside this file), written by these runs (cell "
           "kinds in brackets):",
           ""] + [f"* `{c}` [{', '.join(sorted(k))}]" for c, k in sorted(cmds.items())] + [""]
    out += ["## Selection quality (no training)", "",
            "Shares of the k = ratio × N picks (see `evoray/tasks/score.py`). `pool` rows are the "
            "pool's base rates; `on-task base` is the wrong-label share among distinct on-task "
            "questions, what a selector blind to labels gets once it keeps only on-task, "
            "distinct questions.", ""]
    cols = _cols(args)
    for task in args.tasks:
        for g in args.generators:
            out += summary_table(rows, task, g, 0.1) + [""]
    for task in args.tasks:
        for key, title in QUALITY_METRICS:
            head = "| method | " + " | ".join(f"{g} {r}" for g, r in cols) + " |"
            lines = [f"### {task}: {title}", "", head, "|---" * (len(cols) + 1) + "|"]
            for method in SELECTORS + ORACLES:
                cells = [rows.get(f"quality|{task}|{g}|{r}|{method}", {}).get(key) for g, r in cols]
                if all(c is None for c in cells):
                    continue
                lines.append(f"| {method} | " + " | ".join(_fmt(c) for c in cells) + " |")
            pool_key = {"wrong_label": "wrong_label", "off_task": "off_task",
                        "near_duplicate_kind": "near_duplicate_kind",
                        "unique_correct": "unique_correct_on_task"}.get(key)
            if pool_key:
                lines.append("| *pool* | " + " | ".join(_fmt(rows.get(f"pool|{task}|{g}", {})
                                                            .get(pool_key)) for g, _ in cols)
                             + " |")
            if key == "wrong_label":
                lines.append("| *on-task base* | " + " | ".join(
                    _fmt(rows.get(f"pool|{task}|{g}", {}).get("on_task_wrong")) for g, _ in cols)
                    + " |")
            out += lines + [""]
    out += downstream_tables(args, rows)
    out += evolution_layer(args)
    if any(k.startswith("evo|") for k in rows):
        out += ["## Evolution, first version: 2 rounds of `evoray evolve` (ratio 0.1, one seed, "
                "the superseded 8-epoch recipe)", "",
                f"Task {args.evolution_task}; round 2's proxy is the round-1 model.", "",
                "| generator | method | round | test acc | wrong-label | pool base | "
                "on-task base | off-task | duplicate | unique-correct | letter TV |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        order = {g: i for i, g in enumerate(GENERATORS)}
        for key in sorted((k for k in rows if k.startswith("evo|")),
                          key=lambda k: (order.get(k.split("|")[2], 9), k)):
            e, gen = rows[key], key.split("|")[2]
            for r in e["rounds"]:
                s, p = r["selection"], r["pool"]
                out.append(f"| {gen} | {e['method']} | {r['round']} | {_fmt(r['accuracy'])} | "
                           f"{_fmt(s['wrong_label'])} | {_fmt(p['wrong_label'])} | "
                           f"{_fmt(p['on_task_wrong'])} | {_fmt(s['off_task'])} | "
                           f"{_fmt(s['duplicate'])} | {_fmt(s['unique_correct'])} | "
                           f"{_fmt(s['letter_tv'])} |")
        out.append("")
    out += proxy_tables(args, rows)
    return "\n".join(out)


def paired(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences ``x - y`` and its two-sided 95% t-interval
    (``len - 1`` degrees of freedom)."""
    from scipy import stats

    d = [x - y for x, y in zip(xs, ys, strict=True)]
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return statistics.mean(d), statistics.mean(d) - half, statistics.mean(d) + half


def downstream_tables(args, rows: dict) -> list[str]:
    """Per task: each method's test accuracy (mean ± standard error over the seeds) and its
    paired difference to random (seed s of both shares the selection and training seed) with a
    95% t-interval; an interval that excludes 0 is marked significant."""
    out = ["## Downstream: test accuracy after LoRA training on the selection", "",
           f"Training in-process with the recipe {json.dumps(args.train)}; seeds "
           f"{args.seeds} (seed s is both the selector's and the training's seed for every "
           "method). Each cell: mean ± standard error over the seeds, then the paired "
           "difference to random, mean [95% t-interval]; **bold** = the interval excludes 0.", ""]
    for task in args.downstream_tasks:
        dcols = [(g, r) for g in args.generators for r in args.downstream_ratios]
        base = rows.get(f"base|{task}")
        lines = [f"### {task}" + (f" (base model: {base['accuracy']:.3f})" if base else ""), "",
                 "| method | " + " | ".join(f"{g} {r} | Δ random" for g, r in dcols) + " |",
                 "|---" * (2 * len(dcols) + 1) + "|"]
        per_seed = []
        for method in SELECTORS + ORACLES:
            cells, shown = [], False
            for g, r in dcols:
                acc = _accuracies(args, rows, task, g, r, method)
                ref = _accuracies(args, rows, task, g, r, "random")
                if not acc:
                    cells += ["–", "–"]
                    continue
                shown = True
                v = list(acc.values())
                cells += [_mean_se(v), "–" if method == "random" else _paired_text(acc, ref)]
                sd = f"{statistics.stdev(v):.3f}" if len(v) > 1 else "–"
                per_seed.append(f"| {method} | {g} {r} | " + " | ".join(
                    f"{acc[s]:.3f}" if s in acc else "–" for s in args.seeds) + f" | {sd} |")
            if shown:
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        out += lines + ["", f"Test accuracy of each seed ({task}):", "",
                        "| method | pool | " + " | ".join(f"seed {s}" for s in args.seeds)
                        + " | s.d. |", "|---" * (len(args.seeds) + 3) + "|"] + per_seed + [""]
        out += _evoselect_against(args, rows, task, dcols)
    return out


def _accuracies(args, rows: dict, task: str, gen: str, ratio: float, method: str) -> dict:
    """Seed -> test accuracy of one downstream cell's stored seeds."""
    return {s: rows[k]["accuracy"] for s in args.seeds
            if (k := f"down|{task}|{gen}|{ratio}|{method}|{s}") in rows}


def _mean_se(v: list[float]) -> str:
    """``mean ± standard error (n=…)``; one seed has no error to show."""
    if len(v) < 2:
        return f"{v[0]:.3f} (n=1)"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) / len(v) ** 0.5:.3f} (n={len(v)})"


def _paired_text(acc: dict, ref: dict) -> str:
    """The paired difference ``acc - ref`` over their common seeds, mean [95% t-interval], bold
    when the interval excludes 0; "–" below two common seeds."""
    both = sorted(set(acc) & set(ref))
    if len(both) < 2:
        return "–"
    m, lo, hi = paired([acc[s] for s in both], [ref[s] for s in both])
    text = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def _evoselect_against(args, rows: dict, task: str, dcols: list) -> list[str]:
    """EvoSelect's paired difference to every other method of the grid, per pool."""
    others = [m for m in SELECTORS + ORACLES if m != "evoselect"]
    lines = []
    for m in others:
        cells = [_paired_text(_accuracies(args, rows, task, g, r, "evoselect"),
                              _accuracies(args, rows, task, g, r, m)) for g, r in dcols]
        if any(c != "–" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [f"EvoSelect minus each method ({task}), paired by seed: mean [95% t-interval]; "
            "**bold** = the interval excludes 0.", "",
            "| method | " + " | ".join(f"{g} {r}" for g, r in dcols) + " |",
            "|---" * (len(dcols) + 1) + "|"] + lines + [""]


def proxy_tables(args, rows: dict) -> list[str]:
    """The trained-proxy layer (``Bench.proxy``): selection quality and label separation."""
    out = []
    for key in sorted(k for k in rows if k.startswith("proxy-sep|")):
        _, task, gen = key.split("|")
        sep = rows[key]
        out += [f"## Trained proxy: could round 2 tell right labels from wrong? ({task}, {gen} "
                "generator, ratio 0.1)", "",
                "The same pool as the selection-quality layer, featurized with the model trained "
                f"on the clean oracle's selection as proxy (test accuracy "
                f"{_fmt(sep['proxy_accuracy'])}; base model as proxy: the quality layer). "
                "AUC = probability that a right-label on-task candidate scores above a "
                f"wrong-label one ({sep['n_on_task']} on-task candidates, "
                f"{_fmt(sep['wrong_on_task'])} wrong; 0.5 = blind to labels):", "",
                "| score | AUC right over wrong |", "|---|---:|",
                f"| attribution (centred cosine to the mean target) | "
                f"{_fmt(sep['auc_attribution'])} |",
                f"| EvoSelect OT mass (first block) | {_fmt(sep['auc_ot_mass'])} |",
                f"| proxy's loss on the candidate (lower = right; no selector uses it) | "
                f"{_fmt(sep['auc_neg_loss'])} |", "",
                "| method | proxy | off-task | duplicate | wrong-label | unique-correct | "
                "letter TV |", "|---|---|---:|---:|---:|---:|---:|"]
        for method in SELECTORS + tuple(PROXY_ABLATIONS) + tuple(ADAM_ROWS):
            for proxy, k in (("base", f"quality|{task}|{gen}|0.1|{method}"),
                             ("trained", f"proxy|{task}|{gen}|0.1|{method}")):
                if k in rows:
                    r = rows[k]
                    out.append(f"| {method} | {proxy} | {_fmt(r['off_task'])} | "
                               f"{_fmt(r['duplicate'])} | {_fmt(r['wrong_label'])} | "
                               f"{_fmt(r['unique_correct'])} | {_fmt(r['letter_tv'])} |")
        p = rows.get(f"pool|{task}|{gen}", {})
        out += [f"| *pool* | | {_fmt(p.get('off_task'))} | – | {_fmt(p.get('wrong_label'))} "
                f"(on-task {_fmt(p.get('on_task_wrong'))}) | – | – |", ""]
    return out


def plots(args, rows: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = [("unique_correct", "quality", args.tasks, args.ratios, "unique-correct share"),
             ("accuracy", "down", args.downstream_tasks, args.downstream_ratios, "test accuracy")]
    for metric, layer, tasks, ratios, label in specs:
        for task in tasks:
            fig, axes = plt.subplots(1, len(args.generators), figsize=(5 * len(args.generators), 4),
                                     squeeze=False)
            drawn = False
            for ax, g in zip(axes[0], args.generators, strict=True):
                for method in SELECTORS + ORACLES:
                    xs, ys = [], []
                    for r in ratios:
                        if layer == "quality":
                            v = rows.get(f"quality|{task}|{g}|{r}|{method}", {}).get(metric)
                        else:
                            vs = [rows[k][metric] for s in args.seeds
                                  if (k := f"down|{task}|{g}|{r}|{method}|{s}") in rows]
                            v = statistics.mean(vs) if vs else None
                        if v is not None:
                            xs.append(r)
                            ys.append(v)
                    if xs:
                        drawn = True
                        ax.plot(xs, ys, marker="o", label=method,
                                linestyle="--" if method in ORACLES else "-")
                if layer == "down" and f"base|{task}" in rows:
                    ax.axhline(rows[f"base|{task}"]["accuracy"], color="grey", lw=0.8,
                               label="base model")
                ax.set(title=f"{task}, {g} generator", xlabel="selection ratio", ylabel=label)
            if drawn:
                axes[0][-1].legend(fontsize=7)
                name = f"quality_{'quick_' if args.quick else ''}{layer}_{task}.png"
                fig.tight_layout()
                fig.savefig(os.path.join(folder, name), dpi=90)
                made.append(name)
            plt.close(fig)
    return made


def report_grid(args, rows: dict):
    """``args`` with its grid widened to every cell in the cache, so that a run restricted to
    some cells (``--generators weak --seeds 0``) still renders all the finished ones."""
    def union(ours, found, order=()):  # canonical order first, then the others sorted
        merged = set(ours) | set(found)
        return [x for x in order if x in merged] + sorted(merged - set(order))

    keys = [k.split("|") for k in rows]
    quality = [k for k in keys if k[0] == "quality"]
    down = [k for k in keys if k[0] == "down"]
    return argparse.Namespace(**{
        **vars(args),
        "tasks": union(args.tasks, [k[1] for k in quality], TASKS),
        "generators": union(args.generators, [k[2] for k in quality + down], GENERATORS),
        "ratios": union(args.ratios, [float(k[3]) for k in quality]),
        "downstream_tasks": union(args.downstream_tasks, [k[1] for k in down], TASKS),
        "downstream_ratios": union(args.downstream_ratios, [float(k[3]) for k in down]),
        "seeds": union(args.seeds, [int(k[5]) for k in down])})


def write_report(args, rows: dict) -> None:
    args = report_grid(args, rows)
    folder = os.path.dirname(args.out) or "."
    text = report(args, rows)
    names = plots(args, rows, folder)
    text += "\n" + "\n".join(f"![{n}]({n})" for n in names) + "\n"
    with open(args.out, "w") as f:
        f.write(text)


def evolution_layer(args) -> list[str]:
    """The evolution layer (``evolution.json`` beside ``args.results``, written by
    ``benchmarks/evolution.py``) as sections of this report; none when that file is absent."""
    path = os.path.join(os.path.dirname(args.results) or ".",
                        "evolution_quick.json" if args.quick else "evolution.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        body = evolution_report(json.load(f)["cells"]).splitlines()
    return ["## Evolution layer: 3 rounds, each round's model the next one's proxy", "",
            *[("#" + line if line.startswith("## ") else line) for line in body[2:]], ""]


def evolution_report(rows: dict) -> str:
    """Per generator and arm, each round's means over the seeds (test accuracy ± s.e., the picks'
    shares, the proxy's competence), then the last round's paired difference of EvoSelect to
    each other arm (``benchmarks/evolution.py``'s cells)."""
    out = ["# Evolution: rounds of `evoray evolve`, each round's model the next one's proxy", "",
           "Written by `benchmarks/evolution.py` from `evolution.json`; lookup task, a fresh pool "
           "each round, ratio 1/3, the downstream recipe continuing from the previous round's "
           "adapter. Test accuracy mean ± standard error over seeds; shares of the picks; the "
           "pool's wrong-label base rate beside them; the round's proxy (round 1: the base "
           "model) on the targets as multiple-choice questions: its accuracy and the AUC of its "
           "loss on the right letter against a wrong one (chance: 0.25 and 0.5).", ""]
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in rows.values():
        groups.setdefault((r["gen"], r["policy"], r["bf16"]), {}).setdefault(
            r["arm"], {})[r["seed"]] = r
    for (gen, policy, bf16), arms in sorted(groups.items()):
        out += [f"## {gen} pool, policy {policy}" + (", bfloat16" if bf16 else ""), "",
                "| arm | round | seeds | test accuracy | wrong-label | pool wrong-label | "
                "off-task | duplicate | unique-correct | proxy acc. | proxy AUC |",
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arm in [a for a in EVOLUTION_ARMS if a in arms]:
            cells = list(arms[arm].values())
            for i in range(max(len(c["rounds"]) for c in cells)):
                rs = [c["rounds"][i] for c in cells if i < len(c["rounds"])]
                acc = [r["accuracy"] for r in rs]
                se = (f" ± {statistics.stdev(acc) / len(acc) ** 0.5:.3f}" if len(acc) > 1
                      else "")
                sel = {k: statistics.mean(r["selection"][k] for r in rs)
                       for k in ("wrong_label", "off_task", "duplicate", "unique_correct")}
                pool = statistics.mean(r["pool"]["wrong_label"] for r in rs)
                proxy = [r["proxy"] for r in rs if r.get("proxy")]  # the competence check
                comp = " | ".join(f"{statistics.mean(p[k] for p in proxy):.3f}" if proxy else "–"
                                  for k in ("accuracy", "auc"))
                out.append(f"| {arm} | {i + 1} | {len(rs)} | {statistics.mean(acc):.3f}{se} | "
                           f"{sel['wrong_label']:.3f} | {pool:.3f} | {sel['off_task']:.3f} | "
                           f"{sel['duplicate']:.3f} | {sel['unique_correct']:.3f} | {comp} |")
        out.append("")
        evo = arms.get("evoselect", {})
        for other in ("random", "attribution"):
            seeds = sorted(s for s in evo if s in arms.get(other, {}))
            last = min([len(evo[s]["rounds"]) for s in seeds]
                       + [len(arms[other][s]["rounds"]) for s in seeds], default=0)
            if len(seeds) < 2 or last == 0:
                continue
            d, lo, hi = paired([evo[s]["rounds"][last - 1]["accuracy"] for s in seeds],
                               [arms[other][s]["rounds"][last - 1]["accuracy"] for s in seeds])
            out.append(f"Round {last}, EvoSelect minus {other}, paired over seeds "
                       f"{', '.join(map(str, seeds))}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% "
                       f"t-interval).")
        out.append("")
    return "\n".join(out)
