"""Selection-quality scores against hand-computed values (evoray.tasks.score)."""

import numpy as np
import pytest

from evoray.tasks import make_splits, simulate_pool
from evoray.tasks.score import letter_tv, pool_rates, selection_quality, separation_auc


def _rec(i, task, qkey, response, correct, kind="clean"):
    return {"id": str(i), "prompt": f"q{qkey}", "response": response,
            "meta": {"task": task, "qkey": qkey, "correct": correct, "kind": kind}}


PICKS = [
    _rec(0, "t", "a", "A", "A"),                          # unique correct
    _rec(1, "t", "a", "A", "A", "near_duplicate"),        # repeats question a
    _rec(2, "t", "b", "B", "C", "wrong_label"),           # wrong label
    _rec(3, "other", "c", "D", "D", "off_task"),          # off-task
    _rec(4, "t", "d", "C", "C", "near_duplicate"),        # original not picked: not redundant
]
TARGETS = [{"response": x} for x in "AABC"]


def test_selection_quality_by_hand():
    q = selection_quality(PICKS, TARGETS, "t")
    assert q["k"] == 5
    assert q["off_task"] == pytest.approx(1 / 5)
    assert q["duplicate"] == pytest.approx(1 - 4 / 5)          # questions a, b, c, d
    assert q["near_duplicate_kind"] == pytest.approx(2 / 5)
    assert q["wrong_label"] == pytest.approx(1 / 5)
    assert q["unique_correct"] == pytest.approx(2 / 5)         # a and d
    # picks A A B D C vs targets A A B C: |.4-.5| + |.2-.25| + |.2-.25| + |.2-0| = .4 -> .2
    assert q["letter_tv"] == pytest.approx(0.2)


def test_counts_weigh_repeated_draws():
    q = selection_quality(PICKS[:1] + PICKS[2:3], TARGETS, "t", counts=[3, 1])
    assert q["k"] == 4 and q["duplicate"] == pytest.approx(1 - 2 / 4)
    assert q["wrong_label"] == pytest.approx(1 / 4) and q["unique_correct"] == pytest.approx(1 / 4)


def test_letter_tv_bounds():
    assert letter_tv(list("ABCD"), list("DCBA")) == 0
    assert letter_tv(list("AA"), list("BB")) == 1


def test_pool_rates_on_the_weak_preset():
    """Exact mix of the weak preset on 2,000: 700 clean, 400 wrong, 500 off-task, 400 dups."""
    pool = simulate_pool(make_splits("lookup", 0), 2000, "weak", 0)
    r = pool_rates(pool, "lookup")
    assert r["off_task"] == 0.25 and r["near_duplicate_kind"] == 0.2
    # distinct on-task questions are the 1,100 originals; 400 of them carry a wrong letter
    assert r["on_task_wrong"] == pytest.approx(400 / 1100)
    assert r["unique_correct_on_task"] == pytest.approx(700 / 1100)
    wrong_dups = sum(1 for x in pool if x["meta"]["kind"] == "near_duplicate"
                     and x["response"] != x["meta"]["correct"])
    assert r["wrong_label"] == pytest.approx((400 + wrong_dups) / 2000)


def test_records_without_ground_truth_are_refused():
    with pytest.raises(ValueError, match="no generator ground truth"):
        selection_quality([{"id": "x", "response": "A", "meta": {}}], TARGETS, "t")


def test_separation_auc_against_pair_counting():
    # every (pos, neg) pair by hand: 3>1, 3>2, 2>1 win, 2=2 ties: 3.5 of 4
    assert separation_auc([3, 2], [1, 2]) == 0.875
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 5, 30)  # many ties
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert separation_auc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert separation_auc(neg, pos) == pytest.approx(1 - np.mean(pairs), abs=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        separation_auc([], [1.0])
