"""The hf generator end to end on the session Ray; the vLLM processor as Ray builds it.

A random ``tiny-llama`` never writes a parsable example, so the end-to-end run uses a *scripted*
model: a 1-layer GPT-2 whose attention and MLP are zeroed and whose position embeddings are
one-hot, so the token it emits depends only on its position. Generation step ``k`` draws
uniformly from ``SCRIPT[k]``: a 3-digit question (1000 stems), then the answer ``A``, ``B`` or
``Z`` (``Z`` is not an option, so about a third of the generations do not parse). Which digits
and letters a generation gets is decided by its row seed alone.
"""

import json

import numpy as np
import pytest
import torch

from evoray.config import GenerateConfig, TrainConfig
from evoray.data import read_records
from evoray.generate import RoundContext, make_generator
from evoray.generate.fewshot import GenerateError, few_shot_prompt

pytestmark = pytest.mark.timeout(300)

TARGETS = [{"id": f"t{i}", "prompt": f"Is {i:02d} even?\nA. yes\nB. no\nAnswer:",
            "response": "AB"[i % 2]} for i in range(6)]
DIGITS = "0123456789"
SCRIPT = (list("Is ") + [DIGITS] * 3 + list(" even?\nA. yes\nB. no\nAnswer:\nResponse:\n")
          + ["ABZ"] + list("\n\n###\n"))


def scripted_model(folder: str, script: list[str], start: int) -> None:
    """Save a GPT-2 that, at position ``start + k``, emits one of the characters ``script[k]``
    (uniformly), for any input. Position ``p`` gets the one-hot class ``(p - start) % P`` (plus a
    ``-1`` in an extra dimension, so the final LayerNorm keeps it exactly one-hot up to scale),
    and the LM head maps class ``k`` to the tokens of ``script[k]``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from evoray.models import byte_tokenizer

    tok = byte_tokenizer()
    token_ids = [[tok(ch, add_special_tokens=False)["input_ids"] for ch in chars]
                 for chars in script]
    assert all(len(ids) == 1 for row in token_ids for ids in row)
    token_ids = [[ids[0] for ids in row] for row in token_ids]
    P = len(script)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=P + 1, n_layer=1, n_head=1,
                     tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        for pos in range(cfg.n_positions):
            model.transformer.wpe.weight[pos, (pos - start) % P] = 1.0
            model.transformer.wpe.weight[pos, P] = -1.0
        for k, ids in enumerate(token_ids):
            model.lm_head.weight[ids, k] = 10.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> str:
    from evoray.models import byte_tokenizer

    folder = str(tmp_path_factory.mktemp("scripted") / "model")
    # every 1-shot prompt has the same length: the generation starts at script position 0
    lengths = {len(byte_tokenizer()(few_shot_prompt([t]))["input_ids"]) for t in TARGETS}
    assert len(lengths) == 1
    scripted_model(folder, SCRIPT, lengths.pop() - 1)
    return folder


def _cfg(**kw) -> GenerateConfig:
    return GenerateConfig(**{"kind": "hf", "pool_size": 8, "shots": 1, "batch_size": 3,
                             "max_new_tokens": len(SCRIPT) + 4, "num_cpus": 0.5, **kw})


def test_hf_generates_parses_and_is_deterministic(ray_session, scripted, tmp_path):
    gen = make_generator(_cfg(model=scripted))
    ctx = RoundContext(round=2, seed=5, targets=TARGETS, model="tiny-llama")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    stats = gen.generate(ctx, a)
    assert gen.generate(ctx, b) == stats
    assert stats["n"] + stats["dropped"] == stats["generations"] == 8
    assert stats["n"] >= 1 and stats["dropped"] >= 1  # Z answers do not parse
    assert stats["truncated"] == 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()

    records = read_records(a, "candidate")
    assert [r["id"] for r in records] == [f"r02-hf-{i:06d}" for i in range(stats["n"])]
    rows = [r["meta"]["generation"] for r in records]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    target_ids = {t["id"] for t in TARGETS}
    for r in records:
        assert r["source"] == f"hf:{scripted}"
        assert r["prompt"].startswith("Is ") and r["prompt"].endswith("\nB. no\nAnswer:")
        assert r["response"] in ("A", "B")
        assert len(r["meta"]["shots"]) == 1 and set(r["meta"]["shots"]) <= target_ids
    assert len({r["prompt"] for r in records}) == len(records)  # row seeds differ


def test_hf_adapter_loads_and_unparsable_output_is_a_clear_error(ray_session, tmp_path):
    from evoray.lora import fresh_adapter, write_meta
    from evoray.models import load_model

    base, _ = load_model("tiny-llama")
    adapter = str(tmp_path / "adapter")
    fresh_adapter(base, TrainConfig(), seed=0).save_pretrained(adapter)
    write_meta(adapter, "tiny-llama", base)
    gen = make_generator(_cfg(pool_size=3, max_new_tokens=8))
    ctx = RoundContext(round=1, seed=1, targets=TARGETS, model="tiny-llama", adapter=adapter)
    with pytest.raises(GenerateError, match=r"no usable candidate in 3 generation\(s\): none "
                                            r"parsed.*a raw output") as err:
        gen.generate(ctx, str(tmp_path / "pool.jsonl"))
    assert not (tmp_path / "pool.jsonl").exists()
    # tiny-llama's random text: every generation is counted, parsed or dropped
    stats = err.value.stats
    assert stats["n"] + stats["dropped"] == stats["generations"] == 3 and stats["n"] == 0


def test_vllm_processor_builds_without_vllm(ray_session, scripted):
    """``build_processor`` imports no vLLM: the engine stage alone, fed by ``preprocess``."""
    import functools

    from ray.data.llm import build_processor

    from evoray.generate.vllm import postprocess, preprocess, processor_config

    cfg = _cfg(kind="vllm", model=scripted)
    processor = build_processor(
        processor_config(cfg, scripted),
        preprocess=functools.partial(preprocess, seed=0, max_tokens=8, temperature=0.5,
                                     top_p=1.0),
        postprocess=functools.partial(postprocess, max_tokens=8))
    assert list(processor.stages) == ["vLLMEngineStage"]
    stage = processor.get_stage_by_name("vLLMEngineStage")
    row = preprocess({"row": np.int64(0), "prompt": "x"}, seed=0, max_tokens=8,
                     temperature=0.5, top_p=1.0)
    assert set(stage.get_required_input_keys()) <= set(row)
    assert {"prompt", "model"} <= set(stage.get_optional_input_keys())
    json.dumps(row)  # plain Python values: Arrow stores the column without surprises
