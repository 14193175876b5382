"""Evaluation against hand-computed references, with choice letters tokenized with a leading space
(``" A"`` is one token) and without (``" A"`` is ``[" ", "A"]``)."""

import pytest
import torch

from evoray.data import collate, encode_pair, write_records
from evoray.errors import EvorayError, TrainError
from evoray.models import byte_tokenizer, load_model, prepare_tokenizer
from evoray.train.evaluate import evaluate, evaluate_model, letter_tokens

ITEMS = [
    {"id": "q1", "prompt": "What is 2 + 2?\nA. 3\nB. 4\nAnswer:", "choices": ["A", "B"],
     "answer": "B", "subtask": "add"},
    {"id": "q2", "prompt": "Which is larger?\nA. 7\nB. 9\nC. 8\nAnswer:",
     "choices": ["A", "B", "C"], "answer": "A", "subtask": "compare"},
    {"id": "q3", "prompt": "Day after Monday?\nA. Sun\nB. Tue\nC. Wed\nD. Fri\nAnswer:",
     "choices": ["A", "B", "C", "D"], "answer": "C", "subtask": "compare"},
    {"id": "q4", "prompt": "x?\nA. y\nB. z\nAnswer:", "choices": ["A", "B"], "answer": "A"},
]


def _no_merge_tokenizer():
    """The byte tokenizer with the same ids but no ``" A"`` merges: a space is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = byte_tokenizer().get_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos,
                                                     eos_token=eos, pad_token=eos))


def _reference(model, tok, item, space_in_context: bool):
    """The letter with the highest next-token log-prob, by one unbatched forward pass."""
    ctx = item["prompt"] + (" " if space_in_context else "")
    ids = torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
    letters = [(" " if not space_in_context else "") + c for c in item["choices"]]
    toks = [tok(t, add_special_tokens=False)["input_ids"] for t in letters]
    assert all(len(t) == 1 for t in toks)
    return item["choices"][int(torch.argmax(logp[[t[0] for t in toks]]))]


@pytest.mark.parametrize("merged", [True, False], ids=["space-letter-token", "split-space"])
def test_accuracy_matches_hand_reference(merged):
    model, tok = load_model("tiny-llama", seed=1)
    if not merged:
        tok = _no_merge_tokenizer()
    n_shared, ids = letter_tokens(tok, ["A", "B", "C", "D"])
    assert n_shared == (0 if merged else 1)
    ref = [_reference(model, tok, it, space_in_context=not merged) for it in ITEMS]
    m = evaluate_model(model, tok, ITEMS, batch_size=3)
    assert m["predictions"] == ref
    acc = sum(p == it["answer"] for p, it in zip(ref, ITEMS, strict=True)) / len(ITEMS)
    assert m["accuracy"] == pytest.approx(acc)
    sub = {}
    for p, it in zip(ref, ITEMS, strict=True):
        if "subtask" in it:
            sub.setdefault(it["subtask"], []).append(p == it["answer"])
    assert m["per_subtask"] == {k: {"accuracy": sum(v) / len(v), "n": len(v)}
                                for k, v in sub.items()}
    # mean response loss: each item's loss over " answer" + EOS, one item at a time
    losses = []
    for it in ITEMS:
        e = encode_pair(tok, it["prompt"], it["answer"], 512)
        with torch.no_grad():
            losses.append(model(**collate([e], tok.pad_token_id)).loss.item())
    assert m["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_evaluate_from_file_and_adapter_errors(tmp_path):
    path = str(tmp_path / "test.jsonl")
    write_records(ITEMS, path, "mcq")
    model, tok = load_model("tiny-llama")
    base = evaluate("tiny-llama", None, path, batch_size=2)
    assert base["predictions"] == evaluate_model(model, tok, ITEMS)["predictions"]
    assert base["n"] == 4 and 0.0 <= base["accuracy"] <= 1.0
    with pytest.raises(EvorayError, match="adapter_config.json"):
        evaluate("tiny-llama", str(tmp_path), path)


def test_answer_not_among_choices(tmp_path):
    bad = [{**ITEMS[0], "answer": "C"}]
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "q1", "prompt": "p Answer:", "choices": ["A", "B"], "answer": "C"}\n')
    with pytest.raises(EvorayError, match="not one of the choices"):
        evaluate("tiny-llama", None, str(path))
    model, tok = load_model("tiny-llama")
    with pytest.raises(TrainError, match="not one of its choices"):
        evaluate_model(model, tok, bad)
