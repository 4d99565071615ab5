"""Compiled decode attention over a paged cache's kept rows (families/evict/kernel.py): the kernel against
gather-decode-attend over the same cache, the eviction scores it records, never gathering."""

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvshrink import from_method
from kvshrink.codecs.base import Fp16
from kvshrink.codecs.quant import IntQuant
from kvshrink.core.pool import BlockPool, RowCodec
from kvshrink.families.evict.cache import PagedCache
from kvshrink.families.evict.states import RowStates


@pytest.fixture(scope="module")
def model(tiny_model):
    from kvshrink.attention.function import use_kvshrink_attention

    m = copy.deepcopy(tiny_model)  # switched to the kvshrink attention in place
    use_kvshrink_attention(m)
    return m


def _codecs(kind, group, rotate):
    if kind == "fp16":
        return {}
    return dict(key_codec=IntQuant(kind, "token", group, rotate=rotate, seed=1),
                value_codec=IntQuant(kind, "token", group, rotate=rotate, seed=2))


def _rows(cache) -> list:
    """Per layer, which pool slots are valid and every kept row's stored fields but its score (codes,
    scales, minimums, position) as one (rows, bytes) table, in block-table order."""
    out = []
    for layer in cache.layers:
        names = [k for k in cache.pool.storage if k != "score"]
        rows, valid, _ = layer.gather(names)
        table = torch.cat([rows[k][valid].reshape(int(valid.sum()), -1).contiguous().view(torch.uint8)
                           for k in names], 1)
        out += [valid.clone(), table]
    return out


@torch.no_grad()
@settings(max_examples=15, deadline=None)  # 25 took 29 s of a suite near its 15-minute limit
@given(kind=st.sampled_from(["fp16", 2, 3, 4, 8]), group=st.sampled_from([None, 8]), rotate=st.booleans(),
       ratio=st.sampled_from([2, 4, 8]), block=st.sampled_from([4, 16]), n=st.integers(20, 90),
       steps=st.integers(1, 24), pad=st.integers(0, 10), seed=st.integers(0, 99))
@example(kind=3, group=None, rotate=True, ratio=4, block=4, n=35, steps=15, pad=0, seed=31)  # a flipped code
def test_kernel_equals_gather_then_attend(model, kind, group, rotate, ratio, block, n, steps, pad, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, n), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    nxt = torch.randint(3, 128, (2, steps), generator=g)
    caches, logits, stored = [], [], []
    for attend in ("fused", "decode"):
        cache = PagedCache(model.config, ratio=ratio, block=block, attend=attend, **_codecs(kind, group, rotate))
        m = mask
        out = [model(ids, attention_mask=m, past_key_values=cache).logits[:, -1]]
        rows = [_rows(cache)]
        for i in range(steps):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            out.append(model(nxt[:, i:i + 1], attention_mask=m, past_key_values=cache).logits[:, -1])
            rows.append(_rows(cache))
        caches.append(cache)
        logits.append(torch.stack(out))
        stored.append(rows)
    fused, ref = caches
    assert fused.kernel_reads and not ref.kernel_reads
    # Both paths store the same codes, until float noise (1e-9, the two paths' summation orders)
    # in a token's states lands on a rounding edge and one code differs: from the step that reads it
    # on, each path is right about its own codes. Found: 3-bit rotated values, layer 1, step 14.
    same = [all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(*stored)]
    agree = same.index(False) if False in same else len(same) - 1
    torch.testing.assert_close(logits[0][:agree + 1], logits[1][:agree + 1], rtol=1e-4, atol=1e-4)
    if not same[agree]:  # one token's record (code, scale, minimum) in one head or two, not a different cache
        a, b = stored[0][agree], stored[1][agree]
        assert all(torch.equal(x, y) for x, y in zip(a[0::2], b[0::2]))  # the same rows kept
        assert sum(int((x != y).any(1).sum()) for x, y in zip(a[1::2], b[1::2])) <= 2
        return
    assert torch.equal(fused.kept_tokens(), ref.kept_tokens())  # the same evictions
    for a, b in zip(fused.layers, ref.layers):  # the scores the kernel recorded for every kept row
        ra, va, _ = a.gather(["score", "pos"])
        rb, vb, _ = b.gather(["score", "pos"])
        assert torch.equal(va, vb) and torch.equal(ra["pos"][va], rb["pos"][vb])
        # scores sum softmax weights over the steps: the kernel's polynomial exp differs in the last bits
        torch.testing.assert_close(ra["score"][va], rb["score"][vb], rtol=5e-3, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("name", ["kvc-8x", "kvc-8x+int4"])
def test_kernel_never_gathers_or_decodes_the_rows(model, name, monkeypatch):
    cache = from_method(name, model)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    model(ids, past_key_values=cache)
    layer = cache.layers[0]
    st, _ = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert isinstance(st, RowStates)

    def refuse(*a, **k):
        raise AssertionError("the fused path gathered or decoded the kept rows")

    monkeypatch.setattr(BlockPool, "gather_blocks", refuse)
    monkeypatch.setattr(RowCodec, "decode", refuse)
    before = cache.pool.flat("score").clone()
    out, _ = st.attend(None, torch.randn(1, 4, 1, 16), None)
    assert torch.isfinite(out).all()
    assert (cache.pool.flat("score") != before).any()  # the step's weights reached the eviction scores


@torch.no_grad()
def test_rows_the_kernel_cannot_read_are_gathered_and_it_says_so(model):
    cache = PagedCache(model.config, ratio=4, key_codec=IntQuant(3, "token", 2), value_codec=Fp16())  # 6-bit groups
    assert "no compiled kernel reads these rows" in cache.describe()
    ids = torch.randint(3, 128, (1, 40))
    model(ids, past_key_values=cache)
    assert not cache.kernel_reads
    st, _ = cache.layers[0].update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert not isinstance(st, RowStates)
    assert "numba kernel on the CPU, Triton on CUDA" in from_method("kvc-8x+int4", model).describe()
    assert "gather and decode" in from_method("kvc-8x:attend=decode", model).describe()
