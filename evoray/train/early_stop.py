"""Early stopping on the targets: keep the epoch whose adapter answers the targets best.

A round's selection may still hold wrong labels (a label-blind proxy cannot see them), and the
recipe that learns a clean selection in 16 epochs memorises a noisy one, wrong letters included.
A network fitting noisy labels learns the shared rule before it memorises the exceptions, so an
earlier epoch can be better than the last; the user's targets (clean, a few dozen) tell which.
They are used **for stopping only**, never as training data.

After each epoch the checkpoint's adapter scores the targets read as multiple-choice questions
(:func:`evoray.train.competence.targets_as_mcq`, scored as the test set is): accuracy, then the
mean response loss of the right answers to break ties (lower is better). The best epoch so far is
kept (its checkpoint folder copied aside); training stops once ``patience`` epochs in a row have
not beaten it, and the kept folder becomes the output. :func:`stop_epoch` is the same rule on a
recorded curve (what ``benchmarks/round_policy.py`` reads off per-epoch scores).
"""

from __future__ import annotations

import shutil
import tempfile

from evoray.errors import TrainError

__all__ = ["StopTraining", "KeepBest", "stop_epoch", "better"]


class StopTraining(Exception):
    """Raised from the checkpoint callback to end a local training early."""


def better(a: dict, b: dict | None) -> bool:
    """Whether score ``a`` beats ``b`` (None: nothing yet): higher accuracy, then lower loss."""
    if b is None:
        return True
    if a["accuracy"] != b["accuracy"]:
        return a["accuracy"] > b["accuracy"]
    return a["loss"] < b["loss"]


def stop_epoch(scores: list[dict], patience: int) -> tuple[int, int]:
    """``(best, stopped)``: the epoch (1-based) that early stopping with ``patience`` keeps, and
    the epoch after which it stops, reading ``scores[e - 1]`` as epoch ``e``'s target score."""
    best, best_score = 0, None
    for e, s in enumerate(scores, start=1):
        if better(s, best_score):
            best, best_score = e, s
        elif e - best >= patience:
            return best, e
    return best, len(scores)


class KeepBest:
    """``on_checkpoint`` callback of a local training: scores each epoch's adapter on the targets,
    keeps the best folder in ``self.folder`` and raises :class:`StopTraining` after ``patience``
    epochs without improvement. ``curve`` holds every epoch's score, in order."""

    def __init__(self, model_spec: str, targets: list[dict], patience: int, steps_per_epoch: int,
                 *, max_length: int, cache_dir: str | None = None):
        from evoray.train.competence import targets_as_mcq

        self.items = targets_as_mcq(targets)
        if not self.items:
            raise TrainError(f"train.early_stop_patience needs multiple-choice targets (a prompt "
                             f"listing lettered options, a response that is one of the letters): "
                             f"none of the {len(targets)} target(s) is; set "
                             f"train.early_stop_patience=0")
        self.model_spec, self.patience, self.per_epoch = model_spec, patience, steps_per_epoch
        self.max_length, self.cache_dir = max_length, cache_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="evoray-best-")
        self.folder = f"{self._tmp.name}/best"
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.best_epoch = 0

    def score(self, folder: str) -> dict:
        """The adapter in ``folder`` on the targets: ``accuracy`` and right-answer ``loss``."""
        from evoray.lora import load_with_adapter
        from evoray.train.evaluate import score_items

        model, tok = load_with_adapter(self.model_spec, folder, cache_dir=self.cache_dir)
        preds, losses = score_items(model, tok, self.items, max_length=self.max_length)
        n = len(self.items)
        return {"accuracy": sum(p == it["answer"] for p, it in zip(preds, self.items,
                                                                    strict=True)) / n,
                "loss": sum(losses) / n, "n": n}

    def __call__(self, folder: str, metrics: dict) -> None:
        if metrics["step"] % self.per_epoch:  # a mid-epoch checkpoint (checkpoint_every)
            return
        s = {**self.score(folder), "epoch": metrics["epoch"]}
        self.curve.append(s)
        if better(s, self.best):
            self.best, self.best_epoch = s, metrics["epoch"]
            shutil.rmtree(self.folder, ignore_errors=True)
            shutil.copytree(folder, self.folder)
        elif metrics["epoch"] - self.best_epoch >= self.patience:
            raise StopTraining

    def cleanup(self) -> None:
        self._tmp.cleanup()
