"""Gradient features without Ray: batched per-sample gradients, Adam, projection, extractor."""

import numpy as np
import pytest
import torch

from evoray.config import FeaturesConfig
from evoray.data import collate, encode_pair
from evoray.errors import FeatureError, ModelError
from evoray.features.extract import FeatureExtractor
from evoray.features.grads import BatchedGradients, adam_precondition, reference_gradients
from evoray.features.projection import RademacherProjector
from evoray.lora import attach_lora, lora_pairs, save_adam_state
from evoray.models import load_model

TARGETS = {"tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "tiny-gpt2": ["c_attn", "c_proj"]}
PROMPTS = ["What is 17 + 25?", "Convert 3 km to m. Choices: A 30, B 300, C 3000, D 30000.",
           "Which day comes 10 days after Monday?", "Is 7 kg more than 7000 g?",
           "12 * 12 =", "Compare 0.5 and 1/3.", "How many minutes are in 2.5 hours? Think.",
           "Answer with one letter."]


def _trained_adapter(name, tmp_path, seed=1):
    """An adapter folder whose B matrices are non-zero, as after training."""
    base, _ = load_model(name)
    model = attach_lora(base, target_modules=TARGETS[name])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora_pairs(model):
            pair.B.weight.copy_(0.05 * torch.randn(pair.B.weight.shape, generator=gen))
    model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


def _batch(tok, n, same_length=False):
    prompts = [PROMPTS[0]] * n if same_length else PROMPTS[:n]
    return collate([encode_pair(tok, p, "B", 64) for p in prompts], tok.pad_token_id)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize("batch_size,same_length", [(1, False), (3, False), (8, False),
                                                    (3, True), (8, True)])
def test_batched_gradients_equal_reference(name, trained, batch_size, same_length, tmp_path):
    adapter = _trained_adapter(name, tmp_path) if trained else None
    base, tok = load_model(name)
    model = attach_lora(base, target_modules=TARGETS[name], adapter=adapter)
    batch = _batch(tok, batch_size, same_length)
    if batch_size > 1:
        assert same_length == bool(batch["attention_mask"].all())
    batched = BatchedGradients(model)
    assert batched.a_skipped == (not trained)
    grads, losses = batched(batch)
    ref, ref_losses = reference_gradients(model, batch)
    assert torch.allclose(losses, ref_losses, rtol=1e-5)
    for g, r in zip(grads, ref, strict=True):
        if g is None:  # an A matrix of a fresh adapter: its true gradient is zero
            assert not trained and r.abs().max() == 0
        else:
            assert g.shape == r.shape
            assert _rel(g, r) < 1e-5
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_losses_are_per_sample_token_means():
    base, tok = load_model("tiny-llama")
    model = attach_lora(base)
    batch = _batch(tok, 3)
    _, losses = BatchedGradients(model)(batch)
    for n in range(3):
        length = int(batch["attention_mask"][n].sum())
        out = model(input_ids=batch["input_ids"][n:n + 1, :length],
                    labels=batch["labels"][n:n + 1, :length])
        assert losses[n].item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_missing_target_modules_name_the_valid_ones():
    base, _ = load_model("tiny-gpt2")
    with pytest.raises(ModelError, match=r"\['q_proj'.*not in the model.*c_attn"):
        attach_lora(base, target_modules=["q_proj", "v_proj"])


def test_fresh_lora_is_seeded():
    a = [p.A.weight for p in lora_pairs(attach_lora(load_model("tiny-llama")[0], seed=3))]
    b = [p.A.weight for p in lora_pairs(attach_lora(load_model("tiny-llama")[0], seed=3))]
    c = [p.A.weight for p in lora_pairs(attach_lora(load_model("tiny-llama")[0], seed=4))]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_adam_preconditioning_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 3, 4, generator=gen)
    m, v = torch.randn(3, 4, generator=gen), torch.rand(3, 4, generator=gen)
    out = adam_precondition([g, None], [(m, v), (m, v)])
    for n in range(2):
        for i in range(3):
            for j in range(4):
                m2 = 0.9 * m[i, j].item() + 0.1 * g[n, i, j].item()
                v2 = 0.999 * v[i, j].item() + 0.001 * g[n, i, j].item() ** 2
                assert out[0][n, i, j].item() == pytest.approx(m2 / (v2 + 1e-8) ** 0.5, rel=1e-5)
    assert out[1] is None


def test_extractor_adam_state_roundtrip(tmp_path):
    """save_adam_state → FeatureExtractor(adam_state=...) projects the preconditioned gradient."""
    adapter = _trained_adapter("tiny-llama", tmp_path)
    base, tok = load_model("tiny-llama")
    model = attach_lora(base, adapter=adapter)
    params = [w for p in lora_pairs(model) for w in (p.A.weight, p.B.weight)]
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = _batch(tok, 2)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    out.loss.backward()
    opt.step()
    save_adam_state(opt, model, str(tmp_path / "adam.safetensors"))
    state = [(opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone()) for w in params]

    cfg = FeaturesConfig(dim=64)
    ext = FeatureExtractor(load_model("tiny-llama")[0], tok, cfg, adapter=adapter,
                           adam_state=str(tmp_path / "adam.safetensors"))
    feats, norms, _ = ext(batch)
    plain = FeatureExtractor(load_model("tiny-llama")[0], tok, cfg, adapter=adapter)
    grads, _ = plain.grads(batch)
    pre = adam_precondition(grads, state)
    expected = plain.projector.project(pre).numpy()
    assert np.allclose(feats, expected, rtol=1e-4, atol=1e-6)
    flat = torch.cat([p.reshape(2, -1) for p in pre], 1)
    assert np.allclose(norms, flat.norm(dim=1).numpy(), rtol=1e-5)


def test_projection_preserves_inner_products():
    """JL: 200 random unit vectors in 20,000 dims projected to 1024 keep their inner products
    within a few standard deviations (sd ≈ sqrt((1 + <x,y>²) / d))."""
    d, n = 1024, 200
    x = torch.randn(n, 20_000, generator=torch.Generator().manual_seed(0))
    x[1::2] += 0.5 * x[0::2]  # some correlated pairs, not only near-orthogonal ones
    x = x / x.norm(dim=1, keepdim=True)
    sizes = [12_000, 8_000]
    y = RademacherProjector(sizes, d, seed=7, block_mb=16).project(list(x.split(sizes, 1)))
    exact, approx = x @ x.T, y @ y.T
    sd = torch.sqrt((1 + exact**2) / d)
    err = (approx - exact).abs() / sd
    assert err.max() < 5.5  # 19,900 pairs: a 5.5-sd excursion has probability ~1e-3 in total
    assert (err < 2).float().mean() > 0.93
    assert ((y.norm(dim=1) - 1).abs() < 0.15).all()


def test_projection_is_seeded_and_blockwise():
    sizes = [9000, 300, 5000]
    g = [torch.randn(5, s, generator=torch.Generator().manual_seed(s)) for s in sizes]
    small = RademacherProjector(sizes, 32, seed=1, block_mb=0.5)
    assert small.block_rows == 4096
    big = RademacherProjector(sizes, 32, seed=1, block_mb=64, cache_mb=0)
    a, b = small.project(g), big.project(g)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # same R, other summation blocks
    assert not torch.allclose(a, RademacherProjector(sizes, 32, seed=2).project(g), atol=1e-2)
    assert torch.equal(a, small.project(g))  # cached blocks give the same bits
    assert small.cached_bytes == small.peak_bytes == 4 * 32 * sum(sizes)  # all of R cached
    assert big.cached_bytes == 0 and big.peak_bytes == 4 * 32 * 9000  # one block at a time
    part = RademacherProjector(sizes, 32, seed=1, block_mb=0.5, cache_mb=1)  # fills 1 MiB
    assert torch.equal(part.project(g), a) and torch.equal(part.project(g), a)
    assert 0 < part.cached_bytes <= 2**20 < 4 * 32 * sum(sizes)
    # a skipped (zero) parameter projects like an explicit zero block
    z = [torch.zeros_like(g[0]), g[1], g[2]]
    assert torch.equal(small.project([None, g[1], g[2]]), small.project(z))


def test_projection_matrix_is_the_seeded_bits():
    """R, read back by projecting unit vectors, is the documented stream: chunk c of parameter p's
    rows is PCG64((seed, p, c))'s bytes unpacked most significant bit first, 1 -> +1, 0 -> -1;
    a dim that is not a multiple of 8 and a last chunk shorter than 4096 rows included."""
    sizes, dim, seed = [5000, 3], 12, 4
    proj = RademacherProjector(sizes, dim, seed=seed, block_mb=0.01, cache_mb=0.1)
    for p, size in enumerate(sizes):
        chunks = []
        for c in range(-(-size // 4096)):
            n = min(4096, size - 4096 * c)
            raw = np.random.Generator(np.random.PCG64([seed, p, c])).bytes(4096 * dim // 8)
            bits = np.unpackbits(np.frombuffer(raw, np.uint8))[:n * dim]
            chunks.append(bits.reshape(n, dim).astype(np.float32) * 2 - 1)
        expected = np.concatenate(chunks) / np.sqrt(dim)
        eye = [torch.eye(size) if q == p else None for q in range(len(sizes))]
        got = proj.project(eye).numpy()
        assert np.allclose(got, expected, rtol=0, atol=1e-7)
        assert np.array_equal(np.sign(got), np.sign(expected))


def test_projection_of_a_sample_does_not_depend_on_its_batch():
    sizes = [20_000]
    g = torch.randn(11, 20_000, generator=torch.Generator().manual_seed(0))
    proj = RademacherProjector(sizes, 256, seed=0)
    alone = proj.project([g[3:4]])
    for batch in (g, g[:5], g[3:], g[[7, 3]]):
        row = {11: 3, 5: 3, 8: 0, 2: 1}[len(batch)]
        assert torch.equal(proj.project([batch])[row], alone[0])


def test_projection_passes_do_not_change_features(tmp_path):
    """FeatureExtractor.many projects several batches in one pass: a trained adapter's features
    are bit-identical to one batch at a time, for passes of one batch, two, and all."""
    adapter = _trained_adapter("tiny-llama", tmp_path)
    base, tok = load_model("tiny-llama")
    batches = [(_batch(tok, n), [f"b{i}-{j}" for j in range(n)]) for i, n in enumerate((3, 5, 2))]
    one = FeatureExtractor(base, tok, FeaturesConfig(dim=64), adapter=adapter)
    alone = [one(b, ids=ids) for b, ids in batches]
    row_mb = 4 * sum(one.grads.sizes) / 2**20
    for mb, rows in ((row_mb, 1), (6 * row_mb, 6), (2048, None)):
        ext = FeatureExtractor(load_model("tiny-llama")[0], tok,
                               FeaturesConfig(dim=64, proj_batch_mb=mb), adapter=adapter)
        assert not ext.a_skipped and (rows is None or ext.proj_rows == rows)
        for got, want in zip(ext.many(batches), alone, strict=True):
            assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_non_finite_loss_names_the_sample():
    base, tok = load_model("tiny-llama")
    with torch.no_grad():
        base.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    ext = FeatureExtractor(base, tok, FeaturesConfig(dim=16))
    with pytest.raises(FeatureError, match="sample 'c1': non-finite"):
        ext(_batch(tok, 2), ids=["c1", "c2"])


def test_extractor_features_equal_projected_reference():
    base, tok = load_model("tiny-llama")
    cfg = FeaturesConfig(dim=128)
    batched = FeatureExtractor(base, tok, cfg)
    reference = FeatureExtractor(load_model("tiny-llama")[0], tok, cfg, reference=True)
    batch = _batch(tok, 5)
    f1, n1, l1 = batched(batch)
    f2, n2, l2 = reference(batch)
    assert batched.a_skipped and not reference.a_skipped
    rel = np.linalg.norm(f1 - f2, axis=1) / np.linalg.norm(f2, axis=1)
    assert rel.max() < 1e-5
    assert np.allclose(n1, n2, rtol=1e-5) and np.allclose(l1, l2, rtol=1e-6)


def test_bf16_features_are_close_to_float32_and_deterministic():
    """features.bf16: the proxy's forward and backward under bfloat16 autocast give features
    within 2% of float32's (0.6% measured on tiny-llama), the same ones on a rerun, and not the
    float32 ones bit for bit, so the autocast did run."""
    base, tok = load_model("tiny-llama")
    batch = _batch(tok, 6)
    out = {}
    for bf16 in (False, True, True):
        ex = FeatureExtractor(load_model("tiny-llama")[0], tok, FeaturesConfig(dim=128, bf16=bf16))
        out.setdefault(bf16, []).append(ex(batch))
    (f32, n32, l32), (fb, nb, lb), (fb2, _, _) = out[False][0], *out[True]
    assert np.array_equal(fb, fb2)
    assert not np.array_equal(fb, f32)
    rel = np.linalg.norm(fb - f32, axis=1) / np.linalg.norm(f32, axis=1)
    cos = (fb * f32).sum(1) / np.linalg.norm(fb, axis=1) / np.linalg.norm(f32, axis=1)
    assert rel.max() < 0.02 and cos.min() > 0.999
    assert np.allclose(nb, n32, rtol=0.02) and np.allclose(lb, l32, rtol=0.002)


def test_bf16_is_in_the_cache_key_only_when_set(tmp_path):
    """A setting added after features were first cached keeps the older caches valid: with
    bf16 off the key is what it was before the setting existed; on, it is another key."""
    from evoray.features import key

    assert "bf16" not in key.value_settings(FeaturesConfig())
    assert key.value_settings(FeaturesConfig(bf16=True))["bf16"] is True
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"id": "a", "prompt": "p", "response": "r"}\n')
    keys = {key.input_hash(str(pool), "tiny-llama", None, None, FeaturesConfig(bf16=b), 256)
            for b in (False, True)}
    assert len(keys) == 2


def test_batch_plan_depends_on_content_only():
    """Permuting the candidates permutes their (batch, slot): the same record lands in the same
    batch at the same place whatever the pool's order; batches run shortest first, full except
    the last, and each is sorted by (length, key)."""
    from evoray.features.plan import plan_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 9, 40)
    keys = rng.integers(0, 2**64, 40, dtype=np.uint64)
    batch, slot = plan_batches(lengths, keys, 6)
    assert sorted(slot.tolist()) == list(range(40)) and np.array_equal(batch, slot // 6)
    assert np.bincount(batch).tolist() == [6] * 6 + [4]
    by_slot = np.argsort(slot)
    pairs = sorted(zip(lengths.tolist(), keys.tolist(), strict=True))
    assert [(int(lengths[i]), int(keys[i])) for i in by_slot] == pairs
    perm = rng.permutation(40)
    batch2, slot2 = plan_batches(lengths[perm], keys[perm], 6)
    assert np.array_equal(slot2, slot[perm]) and np.array_equal(batch2, batch[perm])


def test_features_version_is_hashed(tmp_path, monkeypatch):
    """Features made by another version of the computation are never reused."""
    from evoray.features import key

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"id": "a", "prompt": "p", "response": "r"}\n')
    args = (str(pool), "tiny-llama", None, None, FeaturesConfig(), 256)
    before = key.input_hash(*args)
    monkeypatch.setattr(key, "FEATURES_VERSION", key.FEATURES_VERSION + 1)
    assert key.input_hash(*args) != before


def test_batch_tokens_and_actor_memory():
    """The feature actor's memory request: the largest batch's padded token slots against a
    loop over the batches, and the sum of its parts (the projection cache capped, nothing but the
    process and the weights on a GPU)."""
    from evoray.features.plan import actor_memory, batch_tokens

    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 50, 37)
    batches = rng.integers(0, 5, 37)
    want = max(int((batches == b).sum()) * int(lengths[batches == b].max())
               for b in np.unique(batches))
    assert batch_tokens(lengths, batches) == want
    assert batch_tokens(np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0

    shape = {"params": 1000, "lora_params": 10, "vocab": 7}
    mib, gib = 2 ** 20, 2 ** 30
    kw = {"proj_cache_mb": 1, "proj_block_mb": 2, "tokens": 5, "rows": 3, "batch_size": 4}
    base = 1.25 * gib + 4000 + 100_000 * 3
    small = actor_memory(shape, 16, on_gpu=False, **kw)
    assert small == int(1.25 * (base + 4 * 10 * 16 + 2 * mib + 12 * 7 * 5 + 4 * 10 * 4))
    big = {**shape, "lora_params": 10 ** 6}  # 4e6 * 16 bytes of projection: capped at 1 MiB
    assert actor_memory(big, 16, on_gpu=False, **kw) == int(
        1.25 * (base + mib + 2 * mib + 12 * 7 * 5 + 4 * 10 ** 6 * 4))
    assert actor_memory(big, 16, on_gpu=True, **kw) == int(1.25 * base)


def test_tokenize_assign_adds_the_plan_and_drops_unusable_rows(tmp_path):
    """Pass 2 of the features stage: each usable row gets its plan columns by id, a row that
    does not fit max_length is dropped, and an id the plan lacks is an error, not a wrong row."""
    import pyarrow.fs as pafs

    from evoray.errors import EvorayError
    from evoray.features.plan import tokenize_assign, tokenize_batch, write_plan

    fs = pafs.LocalFileSystem()
    plan = {"id": np.array(["a", "b", "c", "é"]), "row": np.array([0, 1, 2, 3]),
            "batch": np.array([1, 0, 0, 1]), "slot": np.array([2, 0, 1, 3]),
            "unit": np.array([0, 0, 0, 0])}  # ids sorted as str; "é" is 2 bytes in UTF-8
    path = str(tmp_path / "plan.parquet")
    write_plan(path, fs, plan)
    batch = {"id": np.array(["c", "é", "a", "b"]), "prompt": np.array(["x", "w", "y", "z"]),
             "response": np.array(["ok", "yes", "fine", "word " * 200])}
    out = tokenize_assign(batch, "tiny-llama", 64, None, path, fs)
    assert out["id"].to_pylist() == ["c", "é", "a"]  # "b"'s response does not fit 64 tokens
    assert out["row"].to_pylist() == [2, 3, 0]
    assert out["batch"].to_pylist() == [0, 1, 1] and out["slot"].to_pylist() == [1, 3, 2]
    alone = tokenize_batch(batch, "tiny-llama", 64, None)  # the same tokens as pass 1's
    assert out["input_ids"].to_pylist() == alone["input_ids"].to_pylist()[:3]
    assert out["n_context"].to_pylist() == alone["n_context"].to_pylist()[:3]
    batch["id"] = np.array(["c", "zz", "a", "b"])
    with pytest.raises(EvorayError, match="'zz' was not in the pool"):
        tokenize_assign(batch, "tiny-llama", 64, None, path, fs)
