"""Selection quality, scored with the ground truth that the simulated generator keeps in ``meta``.

Selectors never read ``meta``; benchmarks and reports do, through :func:`selection_quality`.
Every share is over the ``k`` picks (a pick drawn ``count`` times counts ``count`` times):

* ``off_task``: picks of another task family (``meta.task`` differs from the target task);
* ``duplicate``: redundant picks, i.e. picks whose question (``meta.qkey``) an earlier pick
  already asks: ``1 - distinct questions / k``. A near-duplicate whose original was not picked
  is a new question to the model and is not redundant; ``near_duplicate_kind`` reports the
  share of picks the generator wrote as near-duplicates, whether or not their original was picked;
* ``wrong_label``: on-task picks whose response is not ``meta.correct``;
* ``unique_correct``: distinct on-task questions picked with the right letter, over ``k``;
* ``letter_tv``: total-variation distance between the answer letters of the picks and those
  of the targets, ``½ Σ_L |p_sel(L) − p_tgt(L)|``.

:func:`pool_rates` gives the pool's base rates of the same quantities: a label-blind selector
that keeps only on-task, distinct questions gets the ``on_task_wrong`` rate, not the pool's.
"""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["selection_quality", "pool_rates", "letter_tv", "separation_auc"]


def _meta(rec: dict) -> dict:
    meta = rec.get("meta")
    if not isinstance(meta, dict) or not {"task", "qkey", "correct"} <= set(meta):
        raise ValueError(f"record {rec.get('id')!r} has no generator ground truth in meta "
                         "(task, qkey, correct): only simulated pools can be scored")
    return meta


def letter_tv(responses: list[str], target_responses: list[str]) -> float:
    """Total-variation distance between two answer-letter distributions (0 = the same)."""
    a, b = collections.Counter(responses), collections.Counter(target_responses)
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[x] / na - b[x] / nb) for x in sorted(set(a) | set(b)))


def selection_quality(picks: list[dict], targets: list[dict], task: str,
                      counts: list[int] | None = None) -> dict:
    """Shares of a selection (see the module docstring); ``counts`` = times each pick was drawn.

    Returns:
        ``{"k", "off_task", "duplicate", "near_duplicate_kind", "wrong_label", "unique_correct",
        "letter_tv"}``, shares in [0, 1].
    """
    counts = counts or [1] * len(picks)
    if not picks:
        raise ValueError("an empty selection has no quality")
    k = sum(counts)
    off = dup_kind = wrong = 0
    seen: set[str] = set()
    correct: set[str] = set()
    letters: list[str] = []
    for rec, c in zip(picks, counts, strict=True):
        meta = _meta(rec)
        letters += [rec["response"]] * c
        dup_kind += c * (meta.get("kind") == "near_duplicate")
        seen.add(meta["qkey"])
        if meta["task"] != task:
            off += c
        elif rec["response"] != meta["correct"]:
            wrong += c
        else:
            correct.add(meta["qkey"])
    return {"k": k, "off_task": off / k, "duplicate": 1 - len(seen) / k,
            "near_duplicate_kind": dup_kind / k, "wrong_label": wrong / k,
            "unique_correct": len(correct) / k,
            "letter_tv": letter_tv(letters, [t["response"] for t in targets])}


def pool_rates(pool: list[dict], task: str) -> dict:
    """Base rates of a pool: ``wrong_label`` (share of all candidates, as in a selection),
    ``on_task_wrong`` (share among distinct on-task questions: what a label-blind selector that
    keeps every on-task question once gets), ``off_task``, ``near_duplicate_kind`` and
    ``unique_correct_on_task`` (distinct on-task questions with a right label among distinct
    on-task questions)."""
    on_task: dict[str, bool] = {}
    wrong = off = dup_kind = 0
    for rec in pool:
        meta = _meta(rec)
        dup_kind += meta.get("kind") == "near_duplicate"
        if meta["task"] != task:
            off += 1
            continue
        right = rec["response"] == meta["correct"]
        wrong += not right
        on_task.setdefault(meta["qkey"], right)
    n, q = len(pool), max(1, len(on_task))
    share_right = sum(on_task.values()) / q
    return {"n": n, "wrong_label": wrong / n, "on_task_wrong": 1 - share_right,
            "off_task": off / n, "near_duplicate_kind": dup_kind / n,
            "unique_correct_on_task": share_right}


def separation_auc(pos, neg) -> float:
    """How well a score ranks ``pos`` (e.g. right-label candidates) above ``neg`` (wrong-label
    ones): the probability that a random positive scores higher than a random negative, ties
    counted half (the Mann-Whitney U over ``len(pos) * len(neg)``; 0.5 = blind, 1 = perfect).
    Computed from average ranks with numpy, O((n + m) log(n + m)): the evolve loop calls it, and
    scipy is not a runtime dependency."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("separation_auc needs at least one positive and one negative score")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True,
                                   return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))
