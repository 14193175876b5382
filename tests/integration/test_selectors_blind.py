"""Selectors never read ``meta``: scrambling it, renaming ids and shuffling the pool's order give
the same selected records, compared by content (prompt, response), through the real pipeline
(features stage on Ray Data, then ``select_files`` joining the pool). The cause is checked first:
the three pools' features are byte-identical per record, since the features stage plans its
batches by content. The seeded selectors (a sample, k-means' initial centroids, TSDS's
multinomial) draw over the candidates in the order of their content, so they must survive the
shuffle as well."""

import hashlib
import random

import pytest

from evoray.config import FeaturesConfig, SelectConfig
from evoray.data import read_records, write_records
from evoray.data.features import read_features
from evoray.features.stage import featurize
from evoray.select.io import select_files
from evoray.tasks import write_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SELECTORS = ("random", "attribution", "diversity", "attr_div", "tsds", "evoselect")


def _content(path):
    return sorted((r["prompt"], r["response"]) for r in read_records(path, "candidate"))


@pytest.fixture(scope="module")
def variants(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("blind")
    paths = write_task("lookup", str(root / "task"), pool_size=150, seed=0)
    pool = read_records(paths["pool"], "candidate")
    rng = random.Random(7)
    metas = [r["meta"] for r in pool]
    rng.shuffle(metas)

    def disguise(recs, shuffle):
        out = [{**r, "id": "x" + hashlib.sha1(r["id"].encode()).hexdigest()[:12],
                "meta": {**metas[i], "kind": rng.choice(["clean", "noise"]), "junk": i}}
               for i, r in enumerate(recs)]
        if shuffle:
            rng.shuffle(out)
        return out

    cfg = FeaturesConfig(dim=256, num_cpus=0.5, batch_size=8)
    files = {"targets": featurize(paths["targets"], "tiny-llama", cfg=cfg, kind="target",
                                  out=str(root / "ft"))}
    for name, recs in (("original", pool), ("renamed", disguise(pool, False)),
                       ("shuffled", disguise(pool, True))):
        path = str(root / f"{name}.jsonl")
        write_records(recs, path, "candidate")
        files[name] = (path, featurize(path, "tiny-llama", cfg=cfg, out=str(root / f"f-{name}")))
    return root, files


def test_features_are_byte_identical_per_record(variants):
    """The cause first: the features stage plans its batches by content, so every record's
    feature row (and loss) is the same bytes in all three pools."""
    _, files = variants
    rows = {}
    for name in ("original", "renamed", "shuffled"):
        pool, feats = files[name]
        content = {r["id"]: (r["prompt"], r["response"])
                   for r in read_records(pool, "candidate")}
        f = read_features(feats)
        got: dict = {}
        for rid, x, loss in zip(f.ids, f.X, f.loss, strict=True):
            got.setdefault(content[rid], []).append(x.tobytes() + loss.tobytes())
        rows[name] = {k: sorted(v) for k, v in got.items()}
    assert len(rows["original"]) > 100
    assert rows["renamed"] == rows["original"]
    assert rows["shuffled"] == rows["original"]


@pytest.mark.parametrize("method", SELECTORS)
def test_selection_ignores_meta_ids_and_order(variants, method):
    root, files = variants
    cfg = SelectConfig(method=method, ratio=0.2, seed=3)
    picked = {}
    names = ("original", "renamed", "shuffled")
    for name in names:
        pool, feats = files[name]
        out = str(root / f"sel-{method}-{name}")
        select_files(cfg, feats, files["targets"], out, pool=pool)
        picked[name] = _content(f"{out}/selected.jsonl")
    assert 0 < len(picked["original"]) <= 30  # TSDS draws with replacement: fewer distinct
    for name in names[1:]:
        assert picked[name] == picked["original"], name
