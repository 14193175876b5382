"""Proxy competence: does a round's proxy know the target task well enough to see wrong labels?

Alignment on gradient features can always tell an off-task or duplicate candidate from an on-task
one, but it can see a wrong label only when the proxy already prefers the right answer: a proxy
that scores right and wrong answers alike gives them alike gradients. Two figures tell, measured
on the targets (the user's validation examples), before a round selects:

* ``accuracy``: the proxy's accuracy on the targets read as multiple-choice questions, scored as
  the test set is (:func:`evoray.train.evaluate.score_items`: the likeliest choice letter);
* ``auc``: the AUC of the proxy's response loss on the targets' right answers against their
  wrong letters: the probability that a right answer's loss is below a wrong letter's, over every
  (right answer, wrong letter) pair across targets, ties counted half (the Mann-Whitney
  statistic). It is across targets, not within one question, because that is what a selector
  ranking a pool by loss or gradient faces: one threshold for candidates of every prompt.

**At chance** means neither figure is above chance at one-sided 95%: accuracy below
``1/k + 1.645 * sqrt((1/k)(1 - 1/k) / n)`` (``k`` choices, ``n`` targets; .363 for 40 targets of
4 choices) and AUC below ``0.5 + 1.645 * sqrt((n1 + n2 + 1) / (12 n1 n2))``, the AUC's standard
error under no signal (.587 for 40 right answers against 120 wrong letters).

A target counts as a multiple-choice question when its prompt lists lettered options (lines
``A. text`` or ``A) text``, consecutive letters from A, at least two) and its response is one of
those letters; other targets are left out of both figures (``n`` says how many counted).
"""

from __future__ import annotations

import math
import re

__all__ = ["targets_as_mcq", "loss_auc", "competence", "at_chance", "AT_CHANCE_MESSAGE"]

_OPTION = re.compile(r"^\s*([A-Z])[.)]\s", re.MULTILINE)
Z95 = 1.645  # one-sided 95%
AT_CHANCE_MESSAGE = ("the proxy is at chance on the targets (accuracy {accuracy:.3f}, loss AUC "
                     "{auc:.3f} over {n}): alignment can filter off-task and duplicate "
                     "candidates but cannot see wrong labels yet")


def targets_as_mcq(targets: list[dict]) -> list[dict]:
    """The targets that are multiple-choice questions, as MCQ items (``id``, ``prompt``,
    ``choices``, ``answer``), in order."""
    items = []
    for t in targets:
        letters = _OPTION.findall(t["prompt"])
        run = [chr(ord("A") + i) for i in range(len(letters))]
        answer = str(t["response"]).strip()
        if len(letters) >= 2 and letters == run and answer in letters:
            items.append({"id": t.get("id"), "prompt": t["prompt"], "choices": letters,
                          "answer": answer})
    return items


def loss_auc(right: list[float], wrong: list[float]) -> float:
    """P(a right answer's loss < a wrong letter's loss), ties half: the Mann-Whitney AUC
    (:func:`evoray.tasks.score.separation_auc` of the negated losses); nan when a side is
    empty."""
    from evoray.tasks.score import separation_auc

    if not right or not wrong:
        return float("nan")
    return separation_auc([-x for x in right], [-x for x in wrong])


def at_chance(m: dict) -> bool:
    """Whether neither the accuracy nor the AUC of :func:`competence`'s result ``m`` is above
    chance at one-sided 95% (see the module docstring)."""
    n, k, n_wrong = m["n"], m["k"], m["n_wrong"]
    if n == 0:
        return False  # nothing measured: no claim either way
    p0 = 1.0 / k
    acc_bar = p0 + Z95 * math.sqrt(p0 * (1 - p0) / n)
    auc_bar = 0.5 + Z95 * math.sqrt((n + n_wrong + 1) / (12 * n * n_wrong))
    return m["accuracy"] < acc_bar and m["auc"] < auc_bar


def competence(model, tokenizer, targets: list[dict], *, batch_size: int = 16,
               max_length: int = 512, device: str = "cpu") -> dict:
    """The proxy ``model``'s accuracy and loss AUC on the multiple-choice ``targets``.

    Returns:
        ``{"accuracy", "auc", "n", "k", "n_wrong", "at_chance"}``: ``n`` targets scored (0 when
        none is a multiple-choice question; the figures are then None), ``k`` the commonest
        number of choices, ``n_wrong`` the wrong letters scored.
    """
    from evoray.train.evaluate import score_items

    items = targets_as_mcq(targets)
    if not items:
        return {"accuracy": None, "auc": None, "n": 0, "k": 0, "n_wrong": 0,
                "at_chance": False}
    kw = {"batch_size": batch_size, "max_length": max_length, "device": device}
    preds, right = score_items(model, tokenizer, items, **kw)
    wrong_items = [{**it, "answer": c} for it in items for c in it["choices"]
                   if c != it["answer"]]
    _, wrong = score_items(model, tokenizer, wrong_items, **kw)
    ks = [len(it["choices"]) for it in items]
    m = {"accuracy": sum(p == it["answer"] for p, it in zip(preds, items, strict=True))
         / len(items), "auc": loss_auc(right, wrong), "n": len(items),
         "k": max(set(ks), key=ks.count), "n_wrong": len(wrong_items)}
    m["at_chance"] = at_chance(m)
    return m
