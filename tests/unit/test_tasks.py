"""Built-in tasks and the simulated generator: splits, mix, determinism, decontamination."""

import collections
import filecmp
import json

import pytest

from evoray.data import read_records
from evoray.tasks import FAMILIES, PRESETS, make_splits, simulate_pool, split_records, write_task

TASKS = sorted(FAMILIES)


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_sized(task):
    splits = make_splits(task, seed=3)
    keys = {name: {q.qkey for q in qs} for name, qs in splits.splits.items()}
    assert {name: len(k) for name, k in keys.items()} == {"test": 500, "dev": 200, "val": 40,
                                                          "train": 1000}
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    assert make_splits(task, seed=3).splits == splits.splits
    assert make_splits(task, seed=4).splits["test"] != splits.splits["test"]


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_right(task):
    """Ground truth: recompute the answer of each test question independently."""
    from fractions import Fraction

    from evoray.tasks.families import DAYS

    for q in make_splits(task, seed=0).splits["test"][:200]:
        truth = q.options[q.answer_index]
        if task == "arithmetic":
            a, b, op = q.params["a"], q.params["b"], q.params["op"]
            assert int(truth) == {"+": a + b, "-": a - b, "*": a * b}[op]
        elif task == "day_of_week":
            sign = 1 if q.subtask == "after" else -1
            assert truth == DAYS[(q.params["d"] + sign * q.params["n"]) % 7]
        elif task == "unit_conversion":
            _, pair = q.qkey.rsplit(":", 1)
            frm, to = pair.split("->")
            factor = next(f for big, small, f in FAMILIES[task]._pairs if {big, small} == {frm, to})
            v = q.params["v"]
            expected = v * factor if q.subtask == "to_smaller" else v / factor
            assert float(truth) == pytest.approx(expected)
        elif task == "category":
            words = {c: {w.capitalize() for w in ws} for c, ws in FAMILIES[task]._words.items()}
            assert [o in words[q.subtask] for o in q.options].count(True) == 1
            assert truth in words[q.subtask]
        elif task == "lookup":
            shown = q.params["w"]
            if q.subtask == "word":
                assert q.options.count(shown) == 1 and truth == shown
            elif q.subtask == "even":
                assert [int(o) % 2 == 0 for o in q.options] == [o == truth for o in q.options]
            else:
                assert [o[0].upper() == shown for o in q.options] == [o == truth
                                                                      for o in q.options]
        else:
            def value(s):
                return (float(s[:-1]) / 100 if s.endswith("%") else float(Fraction(s)))
            values = [value(o) for o in q.options]
            best = max(values) if q.subtask == "largest" else min(values)
            assert value(truth) == best and values.count(best) == 1
        assert len(set(q.options)) == 4


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("task", ["arithmetic", "day_of_week"])
def test_mix_matches_preset_on_2000(task, preset):
    pool = simulate_pool(make_splits(task, seed=0), 2000, preset, seed=0)
    assert len(pool) == 2000 and len({r["id"] for r in pool}) == 2000
    counts = collections.Counter(r["meta"]["kind"] for r in pool)
    for kind, share in PRESETS[preset].items():
        assert abs(counts[kind] / 2000 - share) <= 0.03, (kind, counts)
    for r in pool:
        kind, meta = r["meta"]["kind"], r["meta"]
        on_task = meta["task"] == task
        assert on_task == (kind != "off_task")
        assert (r["response"] == meta["correct"]) == (kind != "wrong_label") or \
            kind == "near_duplicate"


def test_near_duplicates_copy_their_original():
    pool = simulate_pool(make_splits("unit_conversion", seed=1), 1000, "weak", seed=5)
    by_id = {r["id"]: (i, r) for i, r in enumerate(pool)}
    dups = [r for r in pool if r["meta"]["kind"] == "near_duplicate"]
    assert dups
    wrong_copies = 0
    for i, r in enumerate(pool):
        if r["meta"]["kind"] != "near_duplicate":
            continue
        j, orig = by_id[r["meta"]["dup_of"]]
        assert j < i, "a near-duplicate follows its original"
        assert orig["meta"]["kind"] in ("clean", "wrong_label")
        assert r["meta"]["qkey"] == orig["meta"]["qkey"]
        assert r["response"] == orig["response"]
        assert r["prompt"] != orig["prompt"]
        assert r["prompt"].split("\n")[1:] == orig["prompt"].split("\n")[1:]  # same options
        wrong_copies += orig["meta"]["kind"] == "wrong_label"
    assert wrong_copies > 0, "near-duplicates of wrong-label items keep the wrong label"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pool_never_emits_eval_questions(task, preset):
    splits = make_splits(task, seed=2)
    pool = simulate_pool(splits, 2000, preset, seed=2)
    pool_keys = {r["meta"]["qkey"] for r in pool}
    for name in ("val", "dev", "test"):
        assert not pool_keys & {r["meta"]["qkey"] for r in split_records(splits, name)}, name
    originals = [r["meta"]["qkey"] for r in pool if r["meta"]["kind"] in ("clean", "wrong_label")]
    assert len(originals) == len(set(originals))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_same_seed_gives_byte_identical_files(tmp_path, fmt):
    a = write_task("arithmetic", str(tmp_path / "a"), pool_size=2000, generator="weak", seed=7,
                   fmt=fmt)
    b = write_task("arithmetic", str(tmp_path / "b"), pool_size=2000, generator="weak", seed=7,
                   fmt=fmt)
    c = write_task("arithmetic", str(tmp_path / "c"), pool_size=2000, generator="weak", seed=8,
                   fmt=fmt)
    for name in a:
        assert filecmp.cmp(a[name], b[name], shallow=False), name
    assert not filecmp.cmp(a["pool"], c["pool"], shallow=False)
    kinds = {"pool": "candidate", "targets": "target", "dev": "mcq", "test": "mcq",
             "train": "candidate"}
    sizes = {name: len(read_records(a[name], kind)) for name, kind in kinds.items()}
    assert sizes == {"pool": 2000, "targets": 40, "dev": 200, "test": 500, "train": 1000}
    summary = json.loads(open(a["task"]).read())
    assert summary["mix"] == {"clean": 700, "wrong_label": 400, "off_task": 500,
                              "near_duplicate": 400}


def test_test_items_are_valid_mcq():
    items = split_records(make_splits("compare", seed=0), "test")
    assert len(items) >= 500
    letters = collections.Counter(r["answer"] for r in items)
    assert set(letters) == {"A", "B", "C", "D"} and min(letters.values()) > 80
    assert all(r["prompt"].endswith("Answer:") for r in items)
