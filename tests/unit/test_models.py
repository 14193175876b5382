"""Model loading, tokenization with response-only labels, truncation and padding."""

import os

import pytest
import torch

import evoray.models
from evoray.data import collate, encode_pair, encode_pairs
from evoray.data.tokenize import IGNORE, ResponseTooLong
from evoray.errors import ModelError
from evoray.models import byte_tokenizer, load_model, response_logits, smollm2_dir

PROMPT = "What is 12 + 30?\nA. 42\nB. 43\nC. 41\nD. 32\nAnswer:"


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_are_seeded_and_ready_for_batches(name):
    m1, tok = load_model(name, seed=1)
    m2, _ = load_model(name, seed=1)
    m3, _ = load_model(name, seed=2)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    assert m1.config.pad_token_id == tok.pad_token_id and not m1.training
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_llama_has_attention_projections():
    model, _ = load_model("tiny-llama")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= names


def test_labels_on_response_tokens_only():
    tok = byte_tokenizer()
    enc = encode_pair(tok, PROMPT, "A", max_length=128)
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt
    response = enc.input_ids[n_prompt:]
    assert enc.labels[n_prompt:] == response
    assert tok.decode(response) == " A" + tok.eos_token
    assert enc.n_response_tokens == 2 and enc.prompt_tokens_cut == 0
    no_eos = encode_pair(tok, PROMPT, "A", max_length=128, add_eos=False)
    assert no_eos.n_response_tokens == 1


def test_prompt_is_cut_from_the_left_and_prefix_kept():
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    enc = encode_pair(tok, PROMPT, "B", max_length=20)
    assert len(enc.input_ids) == 20
    assert enc.input_ids[0] == bos and enc.labels[0] == IGNORE
    n_resp = enc.n_response_tokens
    kept = enc.input_ids[1:20 - n_resp]
    assert kept == prompt_ids[-len(kept):]
    assert enc.prompt_tokens_cut == len(prompt_ids) - len(kept)
    assert tok.decode(enc.input_ids[20 - n_resp:]) == " B" + tok.eos_token


def test_response_too_long_is_an_error_or_a_counted_skip():
    tok = byte_tokenizer()
    long = "x" * 50
    with pytest.raises(ResponseTooLong, match="max_length=40"):
        encode_pair(tok, PROMPT, long, max_length=40)
    records = [{"id": "ok", "prompt": PROMPT, "response": "A"},
               {"id": "long", "prompt": PROMPT, "response": long}]
    with pytest.raises(ResponseTooLong, match="'long'"):
        encode_pairs(tok, records, max_length=40)
    encoded, skipped = encode_pairs(tok, records, max_length=40, on_overflow="skip")
    assert skipped == ["long"] and len(encoded) == 1
    assert all(e.n_response_tokens > 0 for e in encoded)
    # the smallest fitting length keeps exactly one prompt token
    n_resp = len(tok(" " + long, add_special_tokens=False)["input_ids"]) + 1
    assert encode_pair(tok, PROMPT, long, max_length=n_resp + 1).labels[0] == IGNORE


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_batched_right_padded_loss_equals_single(name):
    model, tok = load_model(name, seed=0)
    records = [{"id": str(i), "prompt": PROMPT * (i + 1), "response": r}
               for i, r in enumerate(["A", "the answer is B", "C"])]
    encoded, _ = encode_pairs(tok, records, max_length=256)
    batch = collate(encoded, tok.pad_token_id, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] % 64 == 0
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, enc in enumerate(encoded):
            single = model(input_ids=torch.tensor([enc.input_ids])).logits[0]
            n = len(enc.input_ids)
            torch.testing.assert_close(logits[i, :n], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked_head", [True, False])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_response_logits_match_the_full_forward(name, masked_head, monkeypatch):
    """The response-only head gives the loss and the parameter gradients of
    ``model(**batch).loss``, on the masked path and on the full-logits fallback."""
    monkeypatch.setattr(evoray.models, "_masked_head", lambda: masked_head)
    model, tok = load_model(name, seed=0)
    records = [{"id": str(i), "prompt": PROMPT * (i + 1), "response": r}
               for i, r in enumerate(["A", "the answer is B", "C"])]
    batch = collate(encode_pairs(tok, records, max_length=256)[0], tok.pad_token_id)
    model.zero_grad()
    full = model(**batch).loss
    full.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, target, row, col = response_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(loss, full)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    labels = batch["labels"]
    assert torch.equal(target, labels[row, col + 1])
    assert len(target) == int((labels != IGNORE).sum())
    assert logits.shape == (len(target), model.config.vocab_size)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        load_model(str(tmp_path / "missing-model"))
    with pytest.raises(ModelError, match="could not be loaded"):
        load_model("nobody/no-such-model-here")


@pytest.fixture(scope="module")
def smollm2_first_use(tmp_path_factory):
    """SmolLM2 converted once for the module, as on a fresh machine: the features stage is often
    the first to touch it, so the conversion goes through its layer listing, which runs under the
    meta device (the one-time conversion must still load real weights: transformers refuses
    ``from_pretrained`` under a meta device)."""
    from evoray.config import FeaturesConfig
    from evoray.features.stage import _proxy_shape

    cache = tmp_path_factory.mktemp("cache")
    names, shape = _proxy_shape("smollm2-135m", FeaturesConfig(), None, str(cache))
    # the sizes the feature actor's memory request is computed from (evoray.features.plan)
    assert shape["vocab"] == 49152 and 1.3e8 < shape["params"] < 1.4e8
    assert shape["lora_params"] == 30 * 8 * (576 + 576 + 576 + 192 + 576 + 192 + 576 + 576)
    return cache, names


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_features_convert_smollm2_on_first_use(smollm2_first_use):
    cache, names = smollm2_first_use
    assert (cache / "smollm2-135m" / "model.safetensors").exists()
    assert len(names) == 30 * 4 and all(".self_attn." in n for n in names)  # q, k, v, o


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_converted_once_then_reused(smollm2_first_use):
    cache, _ = smollm2_first_use
    folder = smollm2_dir(str(cache))
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors"} <= files
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    model, tok = load_model("smollm2-135m", cache_dir=str(cache))
    again, _ = load_model("smollm2-135m", cache_dir=str(cache))
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp  # never converted again
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a pretrained model, not random weights: it knows a capital city and answers with a letter
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"
    enc = encode_pair(tok, PROMPT, "A", max_length=64)
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == " A" + tok.eos_token
    assert tok.padding_side == "right" and tok.pad_token_id is not None
