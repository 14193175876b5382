"""Evaluation on a multiple-choice test set: accuracy by choice-letter likelihood, response loss.

docs/algorithms.md §5. Each item is ``prompt`` (ending in ``Answer:``), ``choices`` (capital
letters) and ``answer``. The model reads ``prompt + " " + answer + EOS``, tokenized as in training
(:func:`evoray.data.encode_pair`, the same text a fine-tuned model saw), in right-padded batches.

Which token is scored: the letter **with its leading space**, ``" A"``, since that is how the
letter follows ``Answer:`` in training text. For each letter the tokens of ``" " + letter`` are
taken; their common prefix across the item's choices (e.g. a lone ``" "`` when the tokenizer
splits the space off, as a byte-level tokenizer without merges does) is context shared by every
choice, and the first token after it, one per letter, is scored by its next-token log-probability
at that point. So a tokenizer with ``" A"`` as one token scores it right after the prompt; one
that encodes ``" A"`` as ``[" ", "A"]`` scores ``"A"`` after ``prompt + " "``. The prediction is the
choice with the highest log-probability; ties go to the earlier choice.

The mean response loss is the token-mean cross-entropy over ``" " + answer + EOS`` per item,
averaged over items (nats).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from evoray.data.tokenize import IGNORE, collate, encode_pair, special_prefix
from evoray.errors import TrainError
from evoray.lora import load_with_adapter
from evoray.models import response_logits, sample_means

__all__ = ["evaluate", "evaluate_model", "score_items", "metrics", "letter_tokens", "EvalActor"]

log = logging.getLogger(__name__)


def letter_tokens(tokenizer, letters: list[str]) -> tuple[int, list[int]]:
    """``(n_shared, ids)``: how many leading tokens of ``" " + letter`` all letters share, and
    each letter's first token after them.

    Raises:
        TrainError: two letters start with the same token after the shared part.
    """
    seqs = [tokenizer(" " + ch, add_special_tokens=False)["input_ids"] for ch in letters]
    n = 0
    while all(len(s) > n + 1 for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    ids = [s[n] for s in seqs]
    if len(set(ids)) != len(ids):
        raise TrainError(f"choice letters {letters} are not told apart by one token each with "
                         f"this tokenizer")
    return n, ids


@torch.inference_mode()
def score_items(model, tokenizer, items: list[dict], *, batch_size: int = 16,
                max_length: int = 512, device: str = "cpu") -> tuple[list[str], list[float]]:
    """The predicted letter and the response loss (nats per token) of each MCQ item, in order."""
    model.eval().to(device)
    prefix = special_prefix(tokenizer)
    preds, losses = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encoded, cols, cands = [], [], []
        for item in chunk:
            if item["answer"] not in item["choices"]:
                raise TrainError(f"test item {item.get('id')!r}: answer {item['answer']!r} is "
                                 f"not one of its choices {item['choices']}")
            e = encode_pair(tokenizer, item["prompt"], item["answer"], max_length, prefix=prefix)
            shared, ids = letter_tokens(tokenizer, item["choices"])
            first = next(i for i, t in enumerate(e.labels) if t != IGNORE)
            encoded.append(e)
            cols.append(first + shared - 1)
            cands.append(ids)
        batch = {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
        logits, target, row, col = response_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        losses.extend(sample_means(nll, row, len(chunk)).tolist())
        logp = torch.log_softmax(logits, dim=-1)
        for i, item in enumerate(chunk):
            at = int(((row == i) & (col == cols[i])).nonzero()[0, 0])
            scores = logp[at, cands[i]]
            preds.append(item["choices"][int(torch.argmax(scores))])
    return preds, losses


def metrics(items: list[dict], preds: list[str], losses: list[float]) -> dict:
    """Accuracy, mean loss and per-subtask accuracy from per-item predictions and losses."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    correct = [p == item["answer"] for p, item in zip(preds, items, strict=True)]
    for ok, item in zip(correct, items, strict=True):
        if item.get("subtask"):
            by_task[item["subtask"]].append(ok)
    return {"accuracy": sum(correct) / len(correct), "loss": sum(losses) / len(losses),
            "n": len(items), "predictions": list(preds),
            "per_subtask": {k: {"accuracy": sum(v) / len(v), "n": len(v)}
                            for k, v in sorted(by_task.items())}}


def evaluate_model(model, tokenizer, items: list[dict], *, batch_size: int = 16,
                   max_length: int = 512, device: str = "cpu") -> dict:
    """Metrics of ``model`` (a causal LM, with or without adapter) on validated MCQ ``items``.

    Returns:
        ``{"accuracy", "loss", "n", "per_subtask": {name: {"accuracy", "n"}}, "predictions"}``;
        ``predictions`` is the predicted letter of each item, in order.
    """
    preds, losses = score_items(model, tokenizer, items, batch_size=batch_size,
                                max_length=max_length, device=device)
    return metrics(items, preds, losses)


class EvalActor:
    """Ray Data actor: loads the model (+ adapter) once, scores batches of MCQ items."""

    def __init__(self, model_spec: str, adapter: str | None, batch_size: int, max_length: int,
                 device: str, cache_dir: str | None):
        self.model, self.tok = load_with_adapter(model_spec, adapter, cache_dir=cache_dir)
        self.kw = {"batch_size": batch_size, "max_length": max_length, "device": device}

    def __call__(self, batch: dict) -> dict:
        items = [{"id": i, "prompt": p, "choices": list(c), "answer": a} for i, p, c, a in
                 zip(batch["id"], batch["prompt"], batch["choices"], batch["answer"],
                     strict=True)]
        preds, losses = score_items(self.model, self.tok, items, **self.kw)
        return {"pos": batch["pos"], "prediction": preds, "loss": losses}


def _evaluate_on_ray(model_spec, adapter, items, *, batch_size, max_length, device, cache_dir,
                     num_actors, num_cpus, num_gpus) -> tuple[list[str], list[float]]:
    import ray.data

    from evoray.ray_utils import init_ray

    init_ray()
    rows = [{"pos": n, "id": it["id"], "prompt": it["prompt"], "choices": it["choices"],
             "answer": it["answer"]} for n, it in enumerate(items)]
    ds = ray.data.from_items(rows).map_batches(
        EvalActor, fn_constructor_args=(model_spec, adapter, batch_size, max_length, device,
                                        cache_dir),
        batch_size=batch_size * 4, compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus, num_gpus=num_gpus)
    out = sorted(ds.take_all(), key=lambda r: r["pos"])
    return [r["prediction"] for r in out], [float(r["loss"]) for r in out]


def evaluate(model_spec: str, adapter: str | None, test_path: str, *, batch_size: int = 16,
             max_length: int = 512, device: str = "cpu", cache_dir: str | None = None,
             num_actors: int = 0, num_cpus: float = 1.0, num_gpus: float = 0.0,
             limit: int | None = None) -> dict:
    """Accuracy and mean response loss of ``model_spec`` (+ ``adapter``) on an MCQ file.

    Args:
        model_spec: base model (see :func:`evoray.models.load_model`).
        adapter: LoRA adapter folder (path or URI); None = the base model alone.
        test_path: MCQ records (``id``, ``prompt``, ``choices``, ``answer``, optional
            ``subtask``), path or URI.
        num_actors: 0 = score in this process; N = a Ray Data stage of N actors (each with
            ``num_cpus``/``num_gpus``), for large test sets. Both give the same predictions; the
            losses agree to float rounding (batches are cut the same way inside an actor).
        limit: score only the file's first ``limit`` items (None = all).

    Returns:
        See :func:`evaluate_model`.

    Raises:
        RecordError: the file is malformed (e.g. an answer not among the choices).
        ModelError: the adapter is missing or was trained on another base model.
    """
    from evoray.data import read_records

    items = read_records(test_path, "mcq")[:limit]
    kw = {"batch_size": batch_size, "max_length": max_length, "device": device}
    if num_actors > 0:
        # a wrong model or adapter fails here, readably, before any actor starts
        load_with_adapter(model_spec, adapter, cache_dir=cache_dir)
        preds, losses = _evaluate_on_ray(model_spec, adapter, items, cache_dir=cache_dir,
                                         num_actors=num_actors, num_cpus=num_cpus,
                                         num_gpus=num_gpus, **kw)
        return metrics(items, preds, losses)
    model, tok = load_with_adapter(model_spec, adapter, cache_dir=cache_dir)
    return evaluate_model(model, tok, items, **kw)
