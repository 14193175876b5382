"""Generators without Ray: the few-shot parser on recorded outputs, prompts, seeds, the pool file,
the vLLM processor's pieces, and the simulated and pool generators."""

import importlib.util
import json
import os

import pytest

from evoray.config import GenerateConfig
from evoray.data import read_records, write_records
from evoray.errors import ConfigError
from evoray.generate import PoolGenerator, RoundContext, SimulatedGenerator, make_generator
from evoray.generate.fewshot import (
    END,
    INSTRUCTION,
    PRIMER,
    GenerateError,
    few_shot_prompt,
    parse_generation,
    plan_shots,
    round_prompts,
    row_seed,
    write_pool,
)

DATA = os.path.join(os.path.dirname(__file__), os.pardir, "data")
with open(os.path.join(DATA, "generations.json"), encoding="utf-8") as f:
    RECORDED = json.load(f)

MCQ = "What day comes after Monday?\nA. Sunday\nB. Tuesday\nC. Friday\nD. Monday\nAnswer:"


# --- parser -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", RECORDED, ids=[c["name"] for c in RECORDED])
def test_parser_on_recorded_outputs(case):
    parsed = parse_generation(PRIMER + case["text"], complete=case["complete"])
    expected = tuple(case["expected"]) if case["expected"] else None
    assert parsed == expected


def test_recorded_outputs_cover_both_outcomes():
    assert {c["expected"] is None for c in RECORDED} == {True, False}


def _smol(n: int) -> str:
    return next(c["text"] for c in RECORDED if c["name"] == f"smollm2-{n}")


@pytest.mark.parametrize("cut, complete, ok", [
    ("The sun rises every day. What day is it tom", False, False),   # inside the question
    ("The sun rises every day. What day is it tom", True, False),    # ... no response at all
    ("...\nAnswer:\nResponse:\n", False, False),                     # before the letter
    ("...\nAnswer:\nResponse:\nB", False, False),                    # the letter may go on
    ("...\nAnswer:\nResponse:\nB", True, True),                      # EOS after it: fine
    ("...\nAnswer:\nResponse:\nB\n", False, True),                   # its line ended
    ("...\nAnswer:\nResponse:\nB\n\n#", False, True),
])
def test_parser_on_outputs_cut_at_max_new_tokens(cut, complete, ok):
    full = _smol(0)
    head = full[:full.index("\nAnswer:")]
    text = cut.replace("...", head) if cut.startswith("...") else cut
    assert full.startswith(text)
    assert (parse_generation(PRIMER + text, complete=complete) is not None) == ok


def test_general_response_is_dropped_when_cut_and_unterminated():
    text = "Prompt:\nSummarise the plot of Hamlet.\nResponse:\nA prince avenges his father and"
    assert parse_generation(text, complete=False) is None
    assert parse_generation(text, complete=True) == (
        "Summarise the plot of Hamlet.", "A prince avenges his father and")
    assert parse_generation(text + "\n### Example 5", complete=False) is not None


def test_parser_skips_chatter_before():
    text = ("Sure! Here is a new example in the same format.\n\n" + PRIMER + MCQ
            + "\nResponse:\nB\n\n### Example 6\nPrompt:\nWhat")
    assert parse_generation(text) == (MCQ, "B")
    # a chat model repeating the marker: the last Prompt: before the Response: wins
    assert parse_generation(PRIMER + "Okay.\n" + PRIMER + MCQ + "\nResponse: B") == (MCQ, "B")


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), (" B", "B"), ("B.", "B"), ("(B)", "B"), ("B) Tuesday", "B"), ("B. Tuesday", "B"),
    ("B: Tuesday", "B"), ("\n\nC\n", "C"),
    ("B\n\nExplanation: Tuesday follows Monday.", "B"),  # chatter after the letter's line
    ("E", None),            # not an option
    ("b", None),            # options are capitals
    ("A lot of days", None),
    ("Tuesday", None),
    ("", None),
])
def test_mcq_response_is_one_option_letter(answer, letter):
    parsed = parse_generation(f"{PRIMER}{MCQ}\nResponse:\n{answer}\n### Example 4")
    assert (parsed[1] if parsed else None) == letter


def test_mcq_answered_inline_without_response_marker():
    assert parse_generation(PRIMER + MCQ + "\nB\n\n###") == (MCQ, "B")
    assert parse_generation(PRIMER + MCQ[:-len("Answer:")] + "Answer: D") == (MCQ, "D")
    assert parse_generation(PRIMER + MCQ) is None                       # no letter
    assert parse_generation(PRIMER + MCQ + "\nB", complete=False) is None
    assert parse_generation(PRIMER + "What day?\n### Example 5\nAnswer: B") is None


def test_mcq_prompt_needs_two_options():
    assert parse_generation(PRIMER + "What day comes after Monday?\nAnswer:\nResponse:\nA") is None
    assert parse_generation(PRIMER + "Pick one.\nA. x\nAnswer:\nResponse:\nA") is None
    assert parse_generation(PRIMER + "Pick one.\nA) x\nB) y\nAnswer:\nResponse:\nB") == (
        "Pick one.\nA) x\nB) y\nAnswer:", "B")


def test_parser_general_text():
    text = ("**Prompt:** What is the capital of France?\r\n**Response:** Paris is the capital.\r\n"
            "It lies on the Seine.\r\n\r\n### Example 5\r\n")
    assert parse_generation(text) == ("What is the capital of France?",
                                      "Paris is the capital.\nIt lies on the Seine.")
    # a new example without a header ends the response too
    assert parse_generation("Prompt: 2+2?\nResponse: 4\nPrompt: 3+3?\nResponse: 6") == ("2+2?",
                                                                                       "4")
    # documented limitation: closing remarks with no ### or marker line stay in the response
    assert parse_generation("Prompt: Hi\nResponse: Hello!\n\nHope this helps.") == (
        "Hi", "Hello!\n\nHope this helps.")


@pytest.mark.parametrize("text", [
    "",
    "Response: B",                                    # no prompt
    "What day comes after Monday?\nResponse: B",      # no Prompt: marker
    "Prompt:\nWhat day comes after Monday?",          # no response
    "Prompt:\n\nResponse:\nParis",                    # empty prompt
    "Prompt:\nWhat is 2+2?\nResponse:\n\n### Example 3",  # empty response
    "Prompt:\nWhat is 2+2?\n### Example 3\nResponse:\n4",  # header inside the prompt
    "prompt: What is 2+2?\nresponse: 4",              # markers are case-sensitive
])
def test_malformed_outputs_do_not_parse(text):
    assert parse_generation(text) is None


# --- prompts and seeds --------------------------------------------------------------------------

def test_few_shot_prompt_format():
    shots = [{"prompt": "Q1?\nA. x\nB. y\nAnswer:", "response": "A"},
             {"prompt": " Q2? ", "response": " long answer\n"}]
    assert few_shot_prompt(shots) == (
        INSTRUCTION + "\n\n### Example 1\nPrompt:\nQ1?\nA. x\nB. y\nAnswer:\nResponse:\nA\n\n"
        "### Example 2\nPrompt:\nQ2?\nResponse:\nlong answer\n\n### Example 3\nPrompt:\n")
    assert few_shot_prompt([]) == INSTRUCTION + "\n\n### Example 1\nPrompt:\n"
    assert few_shot_prompt(shots).endswith(PRIMER) and END == "\n###"
    # the format of the shots is the format the parser reads
    block = few_shot_prompt(shots[:1]).split("### Example 1\n")[1].split("\n\n###")[0]
    assert parse_generation(block) == ("Q1?\nA. x\nB. y\nAnswer:", "A")


def test_plan_shots_is_seeded_and_without_replacement():
    plan = plan_shots(10, 4, 50, seed=3)
    assert plan == plan_shots(10, 4, 50, seed=3) != plan_shots(10, 4, 50, seed=4)
    assert len(plan) == 50 and all(len(set(row)) == 4 and set(row) <= set(range(10))
                                   for row in plan)
    assert len({tuple(row) for row in plan}) > 1
    assert plan_shots(2, 4, 3, seed=0)[0] in ([0, 1], [1, 0])  # fewer targets than shots
    assert plan_shots(0, 0, 3, seed=0) == [[], [], []]
    with pytest.raises(GenerateError, match="generate.shots=4 but the round has no target"):
        plan_shots(0, 4, 3, seed=0)


def test_round_prompts_show_the_planned_targets():
    targets = [{"id": f"t{i}", "prompt": f"Question {i}?", "response": str(i)} for i in range(5)]
    prompts, plan = round_prompts(targets, 2, 6, seed=1)
    for prompt, row in zip(prompts, plan, strict=True):
        assert prompt == few_shot_prompt([targets[j] for j in row])


def test_row_seed():
    seeds = [row_seed(7, r) for r in range(1000)]
    assert seeds == [row_seed(7, r) for r in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert row_seed(8, 0) != row_seed(7, 0)


def test_row_sampler_draws_each_row_from_its_own_stream():
    import torch

    from evoray.generate.hf import RowSampler

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    seeds = [row_seed(0, r) for r in range(3)]

    def draw(rows, temperature=1.0, top_p=1.0, steps=5):
        sampler = RowSampler([seeds[r] for r in rows], temperature, top_p)
        picks = []
        for _ in range(steps):
            out = sampler(None, scores[rows])
            assert torch.isfinite(out).sum(-1).tolist() == [1] * len(rows)
            picks.append(out.argmax(-1).tolist())
        return [list(p) for p in zip(*picks, strict=True)]

    together = draw([0, 1, 2])
    assert draw([2]) == together[2:] and draw([1, 2]) == together[1:]  # batch-independent
    assert len({tuple(p) for p in together}) > 1
    top = scores.argmax(-1).tolist()
    assert draw([0, 1, 2], temperature=0.0) == [[t] * 5 for t in top]
    assert draw([0, 1, 2], top_p=1e-6) == [[t] * 5 for t in top]


# --- the pool file ------------------------------------------------------------------------------

TARGETS = [{"id": "val-0", "prompt": MCQ, "response": "B"},
           {"id": "val-1", "prompt": "Which is a weekday?\nA. Sunday\nB. Friday\nAnswer:",
            "response": "B"}]


def _new(n: int) -> str:
    return f"Which day is {n} days after Monday?\nA. Monday\nB. Friday\nAnswer:\nResponse:\nA\n###"


def test_write_pool_writes_parsed_and_counts_the_rest(tmp_path):
    gens = [{"text": _new(1), "complete": True},
            {"text": "garbage", "complete": False},
            {"text": MCQ + "\nResponse:\nB\n###", "complete": True},            # copies a target
            {"text": _new(2), "complete": True},
            {"text": "  " + _new(1).replace("\n", " \n"), "complete": True}]  # repeats row 0
    plan = [[0], [1], [0], [1], [0]]
    out = str(tmp_path / "pool.jsonl")
    stats = write_pool(gens, targets=TARGETS, plan=plan, round=3, kind="hf", model="m",
                       out=out, meta={"adapter": "ad"})
    assert stats == {"n": 2, "dropped": 3, "generations": 5, "unparsable": 1, "copies": 2}
    records = read_records(out, "candidate")
    assert [r["id"] for r in records] == ["r03-hf-000000", "r03-hf-000001"]
    assert records[1] == {"id": "r03-hf-000001", "prompt": _new(2).split("\nResponse:")[0],
                          "response": "A", "source": "hf:m",
                          "meta": {"generation": 3, "round": 3, "shots": ["val-1"],
                                   "adapter": "ad"}}
    again = str(tmp_path / "again.jsonl")
    write_pool(gens, targets=TARGETS, plan=plan, round=3, kind="hf", model="m", out=again,
               meta={"adapter": "ad"})
    with open(out, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_write_pool_error_when_nothing_parses_shows_a_raw_output(tmp_path):
    out = tmp_path / "pool.jsonl"
    gens = [{"text": "\x0eA\x16 S garbage", "complete": False}, {"text": "x", "complete": True}]
    with pytest.raises(GenerateError, match=r"\(hf, model 'tiny-llama', round 1\): no usable "
                                            r"candidate in 2 generation\(s\): none parsed.*"
                                            r"raw output.*A\\x16 S garbage"):
        write_pool(gens, targets=TARGETS, plan=[[0], [1]], round=1, kind="hf",
                   model="tiny-llama", out=str(out))
    with pytest.raises(GenerateError, match="all 1 parsed generation.*repeat a target"):
        write_pool([{"text": MCQ + "\nResponse:\nB", "complete": True}], targets=TARGETS,
                   plan=[[1]], round=1, kind="vllm", model="m", out=str(out))
    assert not out.exists()


# --- vLLM pieces (no vLLM, no GPU, no Ray) ------------------------------------------------------

def test_vllm_processor_config(tmp_path):
    from evoray.generate.vllm import processor_config

    cfg = GenerateConfig(kind="vllm", batch_size=32, num_actors=2,
                         engine_kwargs={"max_model_len": 2048, "enable_lora": False})
    pc = processor_config(cfg, "/models/smol")
    assert (pc.model_source, pc.batch_size, pc.concurrency) == ("/models/smol", 32, 2)
    assert (pc.chat_template_stage, pc.tokenize_stage, pc.detokenize_stage) == (False,) * 3
    assert pc.engine_kwargs["max_model_len"] == 2048
    assert pc.engine_kwargs["enable_lora"] is False  # the user's engine_kwargs win
    assert pc.dynamic_lora_loading_path is None and pc.task_type == "generate"
    assert cfg.engine_kwargs == {"max_model_len": 2048, "enable_lora": False}  # not mutated

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    pc = processor_config(GenerateConfig(kind="vllm"), "m", adapter=str(adapter))
    assert pc.engine_kwargs["enable_lora"] is True and pc.engine_kwargs["max_lora_rank"] == 16
    assert pc.dynamic_lora_loading_path is None
    pc = processor_config(GenerateConfig(kind="vllm"), "m", adapter="s3://bucket/run/round_01/")
    assert pc.dynamic_lora_loading_path == "s3://bucket/run"
    assert "max_lora_rank" not in pc.engine_kwargs


def test_vllm_preprocess_and_postprocess(tmp_path):
    from evoray.generate.vllm import lora_request, postprocess, preprocess

    row = preprocess({"row": 4, "prompt": "P"}, seed=9, max_tokens=64, temperature=0.7,
                     top_p=0.9)
    assert row == {"row": 4, "prompt": "P", "sampling_params": {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": row_seed(9, 4),
        "stop": [END], "include_stop_str_in_output": True}}
    assert preprocess({"row": 0, "prompt": "P"}, seed=9, max_tokens=1, temperature=0,
                      top_p=1, lora="round_01")["model"] == "round_01"
    assert lora_request("s3://b/run/round_01") == ("round_01", "s3://b/run")
    assert lora_request(str(tmp_path)) == (str(tmp_path), None)

    engine_row = {"row": 4, "prompt": "P", "generated_text": _new(1) + "\n###",
                  "num_generated_tokens": 64, "generated_tokens": [1, 2]}
    assert postprocess(engine_row, max_tokens=64) == {"row": 4, "text": _new(1) + "\n###",
                                                      "complete": True}
    cut = {**engine_row, "generated_text": "Which day is", "num_generated_tokens": 64}
    assert postprocess(cut, max_tokens=64)["complete"] is False
    eos = {**engine_row, "generated_text": "Which day is", "num_generated_tokens": 10}
    assert postprocess(eos, max_tokens=64)["complete"] is True


def test_vllm_resolve_model(tmp_path):
    from evoray.generate.vllm import resolve_model

    with pytest.raises(GenerateError, match="in-memory test model"):
        resolve_model("tiny-llama")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_generator_without_vllm_says_how_to_install(tmp_path):
    gen = make_generator(GenerateConfig(kind="vllm"))
    with pytest.raises(GenerateError, match=r"pip install 'evoray\[vllm\]'"):
        gen.generate(RoundContext(round=1, seed=1), str(tmp_path / "pool.jsonl"))


def test_hf_generator_needs_ray_running(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    gen = make_generator(GenerateConfig(kind="hf", model="tiny-llama"))
    with pytest.raises(GenerateError, match=r"init_ray\(\) first"):
        gen.generate(RoundContext(round=1, seed=1, targets=TARGETS), str(tmp_path / "p.jsonl"))


def test_hf_preflight_fails_on_the_driver(tmp_path):
    """Errors an actor's constructor would raise reach the driver only as Ray's text: the
    driver checks model, context and adapter first."""
    from evoray.errors import ModelError
    from evoray.generate.hf import _preflight
    from evoray.lora import META_FILE

    _preflight("tiny-llama", None, None, 96)
    with pytest.raises(ModelError, match="nonexistent.*no such directory"):
        _preflight(str(tmp_path / "nonexistent"), None, None, 96)
    with pytest.raises(GenerateError, match="max_new_tokens=512 leaves no room.*512-token"):
        _preflight("tiny-llama", None, None, 512)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(ModelError, match="no adapter_config.json"):
        _preflight("tiny-llama", str(adapter), None, 96)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / META_FILE).write_text(json.dumps({"base_model": "other",
                                                 "fingerprint": {"hidden_size": 576}}))
    with pytest.raises(ModelError, match="does not match 'tiny-llama'"):
        _preflight("tiny-llama", str(adapter), None, 96)


# --- simulated and pool generators --------------------------------------------------------------

def test_simulated_generator(tmp_path):
    from evoray.tasks import make_splits

    gen = make_generator(GenerateConfig(task="day_of_week", pool_size=60))
    assert isinstance(gen, SimulatedGenerator)
    a, b, c = (str(tmp_path / f"{n}.jsonl") for n in "abc")
    assert gen.generate(RoundContext(round=2, seed=2), a) == {"n": 60, "dropped": 0}
    gen.generate(RoundContext(round=2, seed=2), b)
    gen.generate(RoundContext(round=3, seed=3), c)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    two, three = read_records(a, "candidate"), read_records(c, "candidate")
    assert all(r["id"].startswith("r02-day_of_week-weak-") for r in two)
    assert all(r["id"].startswith("r03-") for r in three)
    assert {r["prompt"] for r in two} != {r["prompt"] for r in three}
    reserved = make_splits("day_of_week", 0).reserved
    assert not any(r["meta"]["qkey"] in reserved for r in two + three)


def _pool(path, n: int, prefix: str = "c") -> list[dict]:
    records = [{"id": f"{prefix}{i:03d}", "prompt": f"question {prefix}{i}", "response": "A"}
               for i in range(n)]
    write_records(records, str(path), "candidate")
    return records


def test_pool_generator_one_file_per_round(tmp_path):
    for r in (1, 2):
        _pool(tmp_path / f"round_{r}.jsonl", 3 + r, prefix=f"r{r}-")
    gen = make_generator(GenerateConfig(kind="pool", path=str(tmp_path / "round_{round}.jsonl"),
                                        pool_size=2))
    assert isinstance(gen, PoolGenerator)
    out = str(tmp_path / "out.jsonl")
    assert gen.generate(RoundContext(round=2, seed=2), out) == {"n": 5, "dropped": 0}
    assert [r["id"] for r in read_records(out, "candidate")][0] == "r2-000"  # used whole


def test_pool_generator_samples_without_replacement_across_rounds(tmp_path):
    records = _pool(tmp_path / "big.jsonl", 10)
    gen = PoolGenerator(str(tmp_path / "big.jsonl"), pool_size=4)
    offered: set[str] = set()
    sizes = []
    for r in (1, 2, 3):
        out = str(tmp_path / f"r{r}.jsonl")
        stats = gen.generate(RoundContext(round=r, seed=r, exclude_ids=set(offered)), out)
        ids = {x["id"] for x in read_records(out, "candidate")}
        assert not ids & offered and stats["n"] == len(ids)
        offered |= ids
        sizes.append(len(ids))
    assert sizes == [4, 4, 2] and offered == {x["id"] for x in records}
    with pytest.raises(ConfigError, match="no candidate left for round 4"):
        gen.generate(RoundContext(round=4, seed=4, exclude_ids=offered),
                     str(tmp_path / "r4.jsonl"))
    # the same seed and exclusions give the same sample
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    gen.generate(RoundContext(round=1, seed=7), a)
    gen.generate(RoundContext(round=1, seed=7), b)
    assert read_records(a, "candidate") == read_records(b, "candidate")


def test_make_generator_dispatch():
    from evoray.generate.hf import HFGenerator
    from evoray.generate.vllm import VLLMGenerator

    assert isinstance(make_generator(GenerateConfig(kind="hf")), HFGenerator)
    assert isinstance(make_generator(GenerateConfig(kind="vllm")), VLLMGenerator)
