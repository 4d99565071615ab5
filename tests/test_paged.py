"""Paged per-head eviction (KV-Compress / SnapKV): pool, policies, cache, attention."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvshrink import from_method, prepare
from kvshrink.core.pool import BlockPool
from kvshrink.errors import KvshrinkError
from kvshrink.families.evict import budget
from kvshrink.families.evict.cache import PagedCache


@pytest.fixture()
def model(tiny_model):
    m = copy.deepcopy(tiny_model)  # the paged attention is switched on in place
    prepare(m, "kvc-8x")
    return m


def _ids(n, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


def _fields():
    return {"x": ((4,), torch.float16), "pos": ((), torch.int32)}


def test_pool_reuses_freed_blocks_and_shrinks():
    pool = BlockPool(4, _fields())
    a = pool.alloc(100)
    assert pool.used == 100 and len(set(a.tolist())) == 100
    pool.write(a * 4, {"x": torch.arange(100.0)[:, None].expand(100, 4), "pos": torch.arange(100)})
    cap = pool.capacity
    pool.release(a[10:60])
    b = pool.alloc(20)
    assert set(b.tolist()) <= set(a[10:60].tolist())  # freed blocks come back before any growth
    assert pool.capacity == cap
    before = pool.nbytes()
    keep = torch.cat([a[:10], a[60:], b])
    remap = pool.compact()
    assert remap is not None and pool.nbytes() < before
    new = remap[keep]
    assert (new >= 0).all() and len(set(new.tolist())) == len(keep)
    # the data moved with its block
    assert torch.equal(pool.flat("pos")[new[:10] * 4], torch.arange(10, dtype=torch.int32))
    assert torch.equal(pool.flat("pos")[new[10:50] * 4], torch.arange(60, 100, dtype=torch.int32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(0, 30), st.integers(1, 8), st.integers(0, 2**31))
def test_variable_policy_frees_blocks_by_cost(lengths, budget_blocks, block, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths)
    s = max(lengths) or 1
    raw = torch.rand(len(lengths), s, generator=g)
    protected = torch.rand(len(lengths), s, generator=g) < 0.2
    absent = torch.arange(s)[None] >= n[:, None]
    scores = raw.masked_fill(protected | absent, torch.inf).sort(dim=-1).values
    ev = budget.variable(scores, n, budget_blocks, block)
    evictable = torch.isfinite(scores).sum(1)
    assert (ev >= 0).all() and (ev <= evictable).all()
    after = budget.blocks_of(n - ev, block)
    freed = budget.blocks_of(n, block) - after
    # every eviction frees whole blocks: the evicted count is the partial block plus whole blocks
    first = torch.where(n % block > 0, n % block, block)
    assert ((ev == 0) | ((ev - first) % block == 0)).all()
    assert (freed == torch.where(ev > 0, (ev - first) // block + 1, 0)).all()
    need = int(budget.blocks_of(n, block).sum()) - budget_blocks
    # fits when enough is evictable, never evicts more than needed
    assert int(freed.sum()) <= max(need, 0)
    max_free = torch.where(evictable >= first, (evictable - first) // block + 1, 0)
    assert int(freed.sum()) == min(max(need, 0), int(max_free.sum()))


def _filled(model, ids, **kw):
    cache = PagedCache(model.config, **kw)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_budget_larger_than_the_context_evicts_nothing(model):
    ids = _ids(48)
    cache = PagedCache(model.config, tokens=10_000)
    ref = DynamicCache()
    with torch.no_grad():
        for start in range(0, 48, 16):  # chunks, then one token at a time
            a = model(ids[:, start:start + 16], past_key_values=cache, use_cache=True).logits
            b = model(ids[:, start:start + 16], past_key_values=ref, use_cache=True).logits
            assert torch.allclose(a, b, atol=2e-3, rtol=0)
        x = ids[:, -1:]
        for _ in range(20):
            a = model(x, past_key_values=cache, use_cache=True).logits
            b = model(x, past_key_values=ref, use_cache=True).logits
            assert torch.allclose(a, b, atol=2e-3, rtol=0)
            x = b[:, -1:].argmax(-1)
    assert (cache.kept_tokens() == 68).all() and cache.get_seq_length() == 68
    assert cache.history and all(h["evicted"] == 0 for h in cache.history)


@pytest.mark.parametrize("alloc", ["variable", "uniform"])
def test_kept_tokens_and_positions_are_the_ones_the_scores_chose(model, alloc):
    ids = _ids(96)
    keys = {}
    cache = PagedCache(model.config, tokens=10_000, alloc=alloc, sink=2, window=4, block=4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    # capture what each head holds, then overwrite the scores with known random ones
    g = torch.Generator().manual_seed(1)
    for i, layer in enumerate(cache.layers):
        rows, valid, slots = layer.gather(["pos", "k.x"])
        assert valid.all() and torch.equal(rows["pos"][0, 0].long(), torch.arange(96))
        keys[i] = rows["k.x"].clone()
        cache.pool.flat("score")[slots.flatten()] = torch.rand(slots.numel(), generator=g)
    cache.tokens = [20]
    before = {i: cache.pool.flat("score")[layer.gather(["pos"])[2]].clone() for i, layer in enumerate(cache.layers)}
    cache.compress()
    units = cache.num_layers * 2
    blocks_used = int(budget.blocks_of(cache.kept_tokens(), 4).sum())
    assert blocks_used <= 20 * units // 4
    kept_scores, gone_scores = [], []
    for i, layer in enumerate(cache.layers):
        rows, valid, _ = layer.gather(["pos", "k.x"])
        for h in range(2):
            pos = rows["pos"][0, h][valid[0, h]].long()
            assert torch.equal(pos, pos.sort().values)  # original order kept
            assert set(range(2)) | set(range(92, 96)) <= set(pos.tolist())  # sink and window protected
            # the stored keys are the original ones of those positions
            assert torch.equal(rows["k.x"][0, h][valid[0, h]], keys[i][0, h, pos])
            evictable = torch.ones(96, dtype=torch.bool)
            evictable[:2] = evictable[92:] = False
            sc = before[i][0, h]
            kept = torch.zeros(96, dtype=torch.bool)
            kept[pos] = True
            if (evictable & ~kept).any():
                # within a head, every evicted token scored at most as high as every kept evictable one
                assert sc[evictable & ~kept].max() <= sc[evictable & kept].min() if (evictable & kept).any() else True
            kept_scores.append(sc[evictable & kept])
            gone_scores.append(sc[evictable & ~kept])
            if alloc == "uniform":
                assert len(pos) == 20
    if alloc == "variable":
        assert len({int(n) for n in cache.kept_tokens().flatten()}) > 1  # heads really differ


def test_bytes_fall_after_eviction_and_freed_blocks_are_reused(model):
    ids = _ids(384)
    cache = PagedCache(model.config, tokens=10_000, block=4, interval=4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    full = cache.nbytes()
    assert full >= cache.fp16_nbytes()  # everything kept: at least an fp16 cache's bytes
    cache.tokens = [16]
    cache.compress()
    small = cache.nbytes()
    assert small < full / 3
    assert cache.history[-1]["bytes_before"] == full and cache.history[-1]["bytes_after"] == small
    # the bytes are the storage's own: pool, block tables, lengths, per-sequence counters
    assert small == cache.pool.nbytes() + sum(layer.nbytes() for layer in cache.layers) + 16
    # a long decode at a fixed budget: blocks keep being freed and handed out again, storage stays put
    handed, caps = cache.pool.handed_out, set()
    x = ids[:, -1:]
    with torch.no_grad():
        for _ in range(100):
            x = model(x, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            caps.add(cache.pool.capacity)
    assert cache.pool.handed_out - handed > max(caps)  # more blocks handed out than ever existed
    assert max(caps) <= 64  # the pool's floor: 16 tokens x 4 heads fit in far fewer blocks
    assert int(budget.blocks_of(cache.kept_tokens(), 4).sum()) <= 16 * 4 // 4 + 4 * 1


def test_generation_after_heavy_eviction_keeps_true_positions(model):
    ids = _ids(80)
    seen_pos = []
    def record(m, args, kwargs, out):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen_pos.append(int(pos.max()))

    hook = model.model.rotary_emb.register_forward_hook(record, with_kwargs=True)
    try:
        cache = PagedCache(model.config, tokens=4, block=4, sink=1, window=2, interval=4)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    finally:
        hook.remove()
    assert out.shape[1] == 110
    assert cache.get_seq_length() == 109
    # position ids follow the true length, not the number of kept tokens
    assert seen_pos == [79] + list(range(80, 109))
    kept = cache.kept_tokens()
    assert int(kept.max()) <= 8 and int(kept.min()) >= 1
    for layer in cache.layers:
        rows, valid, _ = layer.gather(["pos"])
        pos = rows["pos"][valid]
        assert int(pos.max()) == 108 and (pos >= 0).all()


def test_fill_reference_matches_prefill_through_the_cache(model):
    from kvshrink.eval.needle import fill, prefill_states

    ids = _ids(100)
    direct = _filled(model, ids, ratio=4)
    states = prefill_states(model, ids)
    filled = PagedCache(model.config, ratio=4)
    fill(filled, states)
    assert torch.equal(direct.kept_tokens(), filled.kept_tokens())
    for a, b in zip(direct.layers, filled.layers):
        ra, va, _ = a.gather(["pos", "score"])
        rb, vb, _ = b.gather(["pos", "score"])
        assert torch.equal(ra["pos"][va], rb["pos"][vb])
        assert torch.allclose(ra["score"][va], rb["score"][vb], atol=1e-5)


def test_ratio_budget_and_batch_budgets(model):
    ids = _ids(480)
    cache = _filled(model, ids, ratio=8, block=4, sink=1, window=2)
    units = cache.num_layers * 2
    assert int(budget.blocks_of(cache.kept_tokens(), 4).sum()) <= 480 * units // (8 * 4)
    assert cache.compression_ratio() > 5  # below 8: the pool keeps at least 64 blocks
    # two sequences, left padding on the first, separate budgets
    batch = _ids(64, batch=2, seed=3)
    mask = torch.ones_like(batch)
    mask[0, :16] = 0
    cache = PagedCache(model.config, tokens=[8, 16], block=4, sink=1, window=2)
    with torch.no_grad():
        # all but the last token: generate then feeds it (transformers 5.0 refuses a fully cached prompt)
        model(batch[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True)
    kept = cache.kept_tokens()
    assert int(budget.blocks_of(kept[0], 4).sum()) <= 8 * units // 4
    assert int(budget.blocks_of(kept[1], 4).sum()) <= 16 * units // 4
    assert int(kept[0].sum()) < int(kept[1].sum())
    for layer in cache.layers:  # padding goes first
        rows, valid, _ = layer.gather(["pos"])
        assert (rows["pos"][0][valid[0]] >= 16).all()
    # and generation runs on with the padded batch
    out = model.generate(batch, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 69)


def test_int4_rows_compose_and_are_smaller(model):
    ids = _ids(128)
    a = from_method("kvc-8x", model)
    b = from_method("kvc-8x+int4", model)
    with torch.no_grad():
        model(ids, past_key_values=a, use_cache=True)
        model(ids, past_key_values=b, use_cache=True)
    assert torch.equal(a.kept_tokens(), b.kept_tokens())  # same prefill scores, same choice
    assert a.pool.used == b.pool.used
    # per token: 2 x (8 code bytes + fp16 scale + fp16 min) + position + score, against 2 x 32 + 8
    assert b.pool.used_nbytes() * 72 == a.pool.used_nbytes() * 32
    with torch.no_grad():
        na = model(ids[:, :1], past_key_values=a, use_cache=True).logits
        nb = model(ids[:, :1], past_key_values=b, use_cache=True).logits
    assert (na - nb).abs().max() < 0.1 * na.abs().max()


def test_crop_drops_the_tail(model):
    ids = _ids(64)
    cache = _filled(model, ids, ratio=2, block=4)
    cache.crop(-24)  # transformers convention: a negative count of tokens to remove
    assert cache.get_seq_length() == 40
    for layer in cache.layers:
        rows, valid, _ = layer.gather(["pos"])
        assert (rows["pos"][valid] < 40).all()


def test_bad_budgets_fail_clearly(model):
    for kw in ({}, {"ratio": 0.5}, {"ratio": 4, "tokens": 8}, {"tokens": 0}, {"ratio": 4, "alloc": "random"},
               {"ratio": 4, "score": "max"}, {"ratio": 4, "block": 0}, {"ratio": 4, "sink": -1}):
        with pytest.raises(KvshrinkError):
            PagedCache(model.config, **kw)
    from kvshrink.codecs.quant import IntQuant

    cache = PagedCache(model.config, ratio=4, key_codec=IntQuant(4, "channel", 16))
    with pytest.raises(KvshrinkError, match="per-token codec"):
        with torch.no_grad():
            model(_ids(8), past_key_values=cache, use_cache=True)
    cache = PagedCache(model.config, tokens=[4, 4, 4])
    with pytest.raises(KvshrinkError, match="batch of 1"):
        with torch.no_grad():
            model(_ids(8), past_key_values=cache, use_cache=True)


def test_deferred_eviction_keeps_the_context_until_the_question_call(model):
    ids = _ids(200)
    cache = PagedCache(model.config, tokens=32, block=4, defer=1)
    with torch.no_grad():
        model(ids[:, :160], past_key_values=cache, use_cache=True)  # the context: kept whole
        assert not cache.history and bool((cache.kept_tokens() == 160).all())
        model(ids[:, 160:], past_key_values=cache, use_cache=True)  # the question: now evicted
    assert len(cache.history) == 1
    assert cache.kept_tokens().float().mean() <= 32 and cache.get_seq_length() == 200
    with pytest.raises(KvshrinkError, match="defer"):
        PagedCache(model.config, ratio=8, defer=-1)


@pytest.mark.parametrize("norm", ["none", "head"])
def test_head_normalization_ranks_heads_on_one_scale(model, norm):
    """Two heads with the same score pattern, one 1000x larger: raw ranking starves the small one,
    per-head normalization keeps the same number of tokens in both."""
    ids = _ids(96)
    cache = PagedCache(model.config, tokens=10_000, sink=2, window=4, block=4, norm=norm)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    pattern = torch.rand(96, generator=torch.Generator().manual_seed(2))
    for layer in cache.layers:
        _, _, slots = layer.gather(["pos"])
        for h, scale in ((0, 1000.0), (1, 1.0)):
            cache.pool.flat("score")[slots[0, h].flatten()] = pattern * scale
    cache.tokens = [40]
    cache.compress()
    kept = cache.kept_tokens()[0]  # (layers, heads)
    if norm == "head":
        assert torch.equal(kept[:, 0], kept[:, 1])
    else:
        assert (kept[:, 0] > kept[:, 1]).all()


def test_max_pooling_spreads_a_peak_over_its_span(tiny_config):
    from kvshrink.families.evict.scores import aggregate

    probs = torch.zeros(1, 1, 1, 1, 12)
    probs[..., 5] = 1.0
    mx = aggregate(probs, "sum", pool=5, pooling="max")[0, 0]
    assert torch.equal(mx, (torch.arange(12) - 5).abs().le(2).float())  # the peak's 2 neighbours each side
    avg = aggregate(probs, "sum", pool=5, pooling="avg")[0, 0]
    torch.testing.assert_close(avg[3:8], torch.full((5,), 0.2))
    with pytest.raises(KvshrinkError, match="unknown pooling"):
        PagedCache(tiny_config, ratio=8, pooling="mean")
