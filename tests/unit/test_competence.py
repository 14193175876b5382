"""The proxy-competence diagnostic: targets read as MCQ, the loss AUC against scipy's
Mann-Whitney statistic, the chance thresholds, and the evolve loop's one-line warning."""

import json
import logging

import pytest
import torch
from scipy.stats import mannwhitneyu

import evoray.train.competence as comp
from evoray.data import collate, encode_pair, write_records
from evoray.demo import demo_config
from evoray.models import load_model
from evoray.stages import file_digest
from evoray.tasks import make_splits, split_records
from evoray.train.competence import at_chance, competence, loss_auc, targets_as_mcq
from evoray.train.evaluate import evaluate_model


def _target(i, prompt, response):
    return {"id": f"t{i}", "prompt": prompt, "response": response}


def test_targets_as_mcq_keeps_only_lettered_questions():
    targets = [_target(0, "Pick one.\nA. x\nB. y\nC. z\nAnswer:", "C"),
               _target(1, "Pick one.\nA) x\nB) y\nAnswer:", " B"),
               _target(2, "What is 2 + 2?", "4"),                       # free response
               _target(3, "Pick one.\nA. x\nB. y\nAnswer:", "C"),        # answer not an option
               _target(4, "Pick one.\nA. x\nC. y\nAnswer:", "A"),        # letters skip B
               _target(5, "Only one.\nA. x\nAnswer:", "A")]              # one option
    items = targets_as_mcq(targets)
    assert [(it["id"], it["choices"], it["answer"]) for it in items] == [
        ("t0", ["A", "B", "C"], "C"), ("t1", ["A", "B"], "B")]
    assert items[0]["prompt"] == targets[0]["prompt"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_auc_is_the_mann_whitney_statistic(seed):
    g = torch.Generator().manual_seed(seed)
    right = torch.randint(0, 6, (17,), generator=g).float().tolist()  # ties on purpose
    wrong = torch.randint(2, 9, (40,), generator=g).float().tolist()
    u = mannwhitneyu(wrong, right).statistic  # counts wrong > right, ties half
    assert loss_auc(right, wrong) == pytest.approx(u / (len(right) * len(wrong)))
    assert loss_auc([1.0], [2.0]) == 1.0 and loss_auc([2.0], [1.0]) == 0.0


def test_chance_thresholds_for_40_targets_of_4_choices():
    base = {"n": 40, "k": 4, "n_wrong": 120}
    # accuracy bar .25 + 1.645 * sqrt(.25 * .75 / 40) = .3626; AUC bar .5 + 1.645 * .0529 = .5871
    assert at_chance({**base, "accuracy": 0.35, "auc": 0.58})
    assert not at_chance({**base, "accuracy": 0.375, "auc": 0.5})
    assert not at_chance({**base, "accuracy": 0.25, "auc": 0.59})
    assert not at_chance({**base, "n": 0, "n_wrong": 0, "accuracy": None, "auc": None})


def _lookup_targets(n=12):
    return split_records(make_splits("lookup", 0), "val")[:n]


def test_competence_matches_item_by_item_reference():
    model, tok = load_model("tiny-llama", seed=3)
    targets = _lookup_targets()
    m = competence(model, tok, targets, batch_size=5)
    items = targets_as_mcq(targets)
    assert m["n"] == len(items) == 12 and m["k"] == 4 and m["n_wrong"] == 36
    ref = evaluate_model(model, tok, items, batch_size=12)
    assert m["accuracy"] == pytest.approx(ref["accuracy"])

    def loss(item, letter):  # one unbatched forward pass per (question, letter)
        e = encode_pair(tok, item["prompt"], letter, 512)
        with torch.no_grad():
            return model(**collate([e], tok.pad_token_id)).loss.item()

    right = [loss(it, it["answer"]) for it in items]
    wrong = [loss(it, c) for it in items for c in it["choices"] if c != it["answer"]]
    assert m["auc"] == pytest.approx(loss_auc(right, wrong), abs=1e-9)
    assert m["at_chance"] == at_chance(m)
    # no multiple-choice target: nothing measured, no claim
    free = [_target(0, "What is 2 + 2?", "4")]
    assert competence(model, tok, free) == {"accuracy": None, "auc": None, "n": 0, "k": 0,
                                           "n_wrong": 0, "at_chance": False}


@pytest.mark.parametrize("chance", [True, False])
def test_evolve_round_records_the_diagnostic_and_warns_at_chance(tmp_path, monkeypatch, caplog,
                                                                 chance):
    """The loop writes proxy.json and the manifest's stage stats, and says in one line, only when
    both figures are at chance, that alignment cannot see wrong labels yet."""
    from evoray.evolve import _Loop

    figures = {"accuracy": 0.25 if chance else 0.8, "auc": 0.5 if chance else 0.9, "n": 40,
               "k": 4, "n_wrong": 120}
    seen = []

    def fake(model, tok, targets, **kw):
        seen.append(len(targets))
        return {**figures, "at_chance": at_chance(figures)}

    monkeypatch.setattr(comp, "competence", fake)
    targets = str(tmp_path / "targets.jsonl")
    write_records(_lookup_targets(40), targets, "target")
    files = {"targets": targets, "targets_hash": file_digest(targets),
             "target_records": _lookup_targets(40)}
    cfg = demo_config(quick=True, **{"evolve.run_dir": str(tmp_path / "run")})
    loop = _Loop(cfg, False, lambda *_: None, False)
    with caplog.at_level(logging.WARNING, logger="evoray"):
        path = loop.proxy_check(1, files, None)
    assert seen == [40]
    written = json.loads(open(path).read())
    assert written == {**figures, "at_chance": chance, "proxy": "base model"}
    stats = loop.manifest.stages["round_01/proxy"]["stats"]
    assert stats == {"accuracy": figures["accuracy"], "auc": figures["auc"], "n": 40,
                     "at_chance": chance}
    warned = [r.getMessage() for r in caplog.records if "cannot see wrong labels" in
              r.getMessage()]
    if chance:
        assert warned == ["round 1: the proxy is at chance on the targets (accuracy 0.250, loss "
                          "AUC 0.500 over 40): alignment can filter off-task and duplicate "
                          "candidates but cannot see wrong labels yet"]
    else:
        assert warned == []


def test_a_trained_proxy_is_not_at_chance_on_its_own_task():
    """End to end on a tiny model: after fitting the targets' letters the figures leave chance."""
    model, tok = load_model("tiny-llama", seed=0)
    targets = _lookup_targets(24)
    before = competence(model, tok, targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate([encode_pair(tok, t["prompt"], t["response"], 512) for t in targets],
                    tok.pad_token_id)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    after = competence(model, tok, targets)
    assert before["at_chance"] and not after["at_chance"]
    assert after["accuracy"] > 0.9 and after["auc"] > 0.9
