"""The downstream table's statistics (``benchmarks/quality_report.py``): the paired difference
and its t-interval against scipy's paired t-test, and which seeds a comparison pairs."""

import argparse
import importlib.util
import os

import pytest
from scipy import stats

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "quality_report.py")
_spec = importlib.util.spec_from_file_location("quality_report", _PATH)
qr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qr)


def test_paired_interval_matches_scipys_paired_t_test():
    x = [0.81, 0.66, 0.74, 0.70, 0.79]
    y = [0.58, 0.70, 0.61, 0.66, 0.60]
    m, lo, hi = qr.paired(x, y)
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert m == pytest.approx(sum(x) / 5 - sum(y) / 5)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def test_paired_text_uses_common_seeds_and_marks_intervals_that_exclude_zero():
    assert qr._paired_text({0: 0.9}, {0: 0.5}) == "–"  # one common seed: no interval
    assert qr._paired_text({0: 0.9, 1: 0.8}, {1: 0.5, 2: 0.4}) == "–"
    up = qr._paired_text({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.5, 1: 0.45, 2: 0.5, 3: 0.9})
    assert up.startswith("**+0.367 [") and up.endswith("]**")  # seed 3 left out
    flat = qr._paired_text({0: 0.9, 1: 0.4}, {0: 0.5, 1: 0.5})
    assert not flat.startswith("**") and flat.startswith("+0.150 [")


def test_downstream_tables_show_evoselect_against_each_method():
    args = argparse.Namespace(train={"epochs": 16}, seeds=[0, 1, 2], downstream_tasks=["lookup"],
                              generators=["strong"], downstream_ratios=[0.1])
    acc = {"random": [0.5, 0.6, 0.55], "evoselect": [0.7, 0.8, 0.76], "tsds": [0.7, 0.9]}
    rows = {f"down|lookup|strong|0.1|{m}|{s}": {"accuracy": a}
            for m, v in acc.items() for s, a in enumerate(v)}
    text = "\n".join(qr.downstream_tables(args, rows))
    assert "| random | 0.550 ± 0.029 (n=3) | – |" in text
    assert "| tsds | 0.800 ± 0.100 (n=2) | +0.250 [-0.385, +0.885] |" in text
    against = text.split("EvoSelect minus each method")[1]
    assert "| random | **+0.203 [" in against and "| tsds | -0.050 [" in against
    assert "| attribution |" not in against  # no cell: no row


def _evo_row(arm, seed, accs, wrong=0.3):
    rounds = [{"round": i + 1, "accuracy": a, "pool": {"wrong_label": 0.25},
               "selection": {"wrong_label": wrong, "off_task": 0.0, "duplicate": 0.0,
                             "unique_correct": 0.6},
               "proxy": {"accuracy": 0.25 + 0.1 * i * seed, "auc": 0.5}}
              for i, a in enumerate(accs)]
    return {"gen": "weak", "arm": arm, "seed": seed, "policy": "fixed", "bf16": True,
            "rounds": rounds}


def test_evolution_report_means_and_round3_paired_difference():
    rows = {}
    evo = {0: [0.3, 0.5, 0.7], 1: [0.3, 0.4, 0.6], 2: [0.2, 0.4, 0.8]}
    rnd = {0: [0.3, 0.3, 0.3], 1: [0.25, 0.3, 0.35], 2: [0.3, 0.3, 0.3]}
    for s in range(3):
        rows[f"e{s}"] = _evo_row("evoselect", s, evo[s], wrong=0.1 * s)
        rows[f"r{s}"] = _evo_row("random", s, rnd[s])
    rows["r9"] = _evo_row("random", 9, [0.9, 0.9, 0.9])  # no EvoSelect cell: not paired
    text = qr.evolution_report(rows)
    se = stats.sem([0.7, 0.6, 0.8])
    # ... | off-task | duplicate | unique-correct | the proxy's accuracy and AUC over the seeds
    assert (f"| evoselect | 3 | 3 | 0.700 ± {se:.3f} | 0.100 | 0.250 | 0.000 | 0.000 | 0.600 | "
            "0.450 | 0.500 |") in text
    assert "| random | 1 | 4 |" in text
    m, lo, hi = qr.paired([0.7, 0.6, 0.8], [0.3, 0.35, 0.3])
    assert (f"Round 3, EvoSelect minus random, paired over seeds 0, 1, 2: {m:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]") in text
    assert "minus attribution" not in text  # no attribution cells
