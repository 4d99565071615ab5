"""Compiled decode attention over ZDC caches (families/lowrank/kernel.py): the kernel against the PyTorch
attention over the same stored states, float16 reading, never decoding, generation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import from_method
from kvshrink.codecs.base import Fp16
from kvshrink.codecs.quant import IntQuant
from kvshrink.core.store import TokenStore
from kvshrink.errors import KvshrinkError
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.lowrank.cache import ZdcCache
from kvshrink.families.lowrank.kernel import LowRankStates
from kvshrink.families.lowrank.states import ZdcStates
from kvshrink.kernels.tiles import half_to_float


@pytest.fixture(scope="module")
def zmodel(tiny_model):
    torch.manual_seed(1)
    return zdc.apply(tiny_model, zdc.calibrate(tiny_model, torch.randint(3, 128, (2, 48)), {"test": True}))


def test_half_to_float_reads_every_finite_half_exactly():
    bits = np.arange(1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)
    src = bits[finite].astype("<u2").view(np.uint8)
    out = np.empty(int(finite.sum()), dtype=np.float32)
    half_to_float(src, out.shape[0], out)
    want = halves[finite].astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))  # bit for bit: subnormals, -0.0 included


def _codecs(kind, block):
    if kind == "fp16":
        return Fp16(), Fp16()
    return IntQuant(kind, "channel", block), IntQuant(kind, "token")


class _Module:  # what the attention reads from the ZDC-transformed layer
    def __init__(self, qk):
        self.zdc_qk = qk


def _layer_pair(zmodel, kind, ranks_k, ranks_v, sink, sink_rank, window, block, n, steps, seed):
    """Two layers fed the same prefill of n tokens and `steps` decode steps, one attending with the
    kernel and one with PyTorch (they hold the same tokens: thawing and deferring do not depend on
    the attend mode); and the generator for what comes next."""
    ranks = zdc.ZdcRanks(torch.tensor([ranks_k] * 2), torch.tensor([ranks_v] * 2), sink_rank=sink_rank)
    kc, vc = _codecs(kind, block)
    layers = []
    for attend in ("fused", "decode"):
        g = torch.Generator().manual_seed(seed)
        cache = ZdcCache(zmodel, ranks, kc, vc, sink=sink, window=window, block=block, attend=attend)
        layer = cache.layers[0]
        scale = torch.linspace(0.2, 3, 16)
        layer.update(torch.randn(2, 2, n, 16, generator=g) * scale, torch.randn(2, 2, n, 16, generator=g))
        for _ in range(steps):
            layer.update(torch.randn(2, 2, 1, 16, generator=g) * scale, torch.randn(2, 2, 1, 16, generator=g))
        layers.append(layer)
    return layers[0], layers[1], g


@torch.no_grad()
@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["fp16", 2, 3, 4, 8]), ranks=st.lists(st.integers(1, 16), min_size=4, max_size=4),
       sink=st.integers(0, 4), sink_rank=st.integers(0, 16), window=st.sampled_from([0, 3]),
       block=st.sampled_from([8, 16]), n=st.integers(1, 90), steps=st.integers(0, 20), t=st.sampled_from([1, 3]),
       pad=st.integers(0, 30), seed=st.integers(0, 99), cap=st.sampled_from([None, 1.5]))
def test_kernel_equals_pytorch_attention_over_the_same_states(zmodel, kind, ranks, sink, sink_rank, window, block, n,
                                                               steps, t, pad, seed, cap):
    if kind != "fp16":  # int codes: whole bytes per token, so ranks of 8 or 16
        ranks = [8 * (1 + r % 2) for r in ranks]
    if window:  # window tokens join the body with sink_rank coordinates
        sink_rank = max(sink_rank, *ranks)
    layer, ref, g = _layer_pair(zmodel, kind, ranks[:2], ranks[2:], sink, sink_rank, window, block, n, steps, seed)
    assert layer.kernel_reads and not ref.kernel_reads
    k, v = torch.randn(2, 2, t, 16, generator=g), torch.randn(2, 2, t, 16, generator=g)
    fused, _ = layer.update(k, v)
    plain, _ = ref.update(k, v)
    assert isinstance(fused, LowRankStates) and isinstance(plain, ZdcStates)
    total = layer.get_seq_length()
    assert fused.length == plain.length == total
    mask = torch.ones(2, 1, t, total, dtype=torch.bool).tril(total - t)
    mask[1, ..., :pad] = False  # left padding of the second sequence: in the sink, the body, or beyond
    q = torch.randn(2, 4, t, 16, generator=g)
    mod = _Module(zmodel.model.layers[0].self_attn.zdc_qk)
    got = fused.attend(mod, q, mask, None, cap)[0]  # cap: Gemma 2's logit soft-cap
    want = plain.attend(mod, q, mask, None, cap)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp16", 4])
@torch.no_grad()
def test_kernel_never_decodes_the_body(zmodel, kind, monkeypatch):
    layer, _, g = _layer_pair(zmodel, kind, [8, 16], [16, 8], 4, 16, 3, 8, 60, 5, 0)
    states, _ = layer.update(torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g))
    # 53 tokens past sink and window: 48 in the body after prefill, 8 more after 5 steps (thawed stage)
    assert states.bodies and all(bk.num_tokens == bv.num_tokens == 56 for bk, bv in states.bodies)
    assert [m[0].shape[-1] for m in states.mids] == [8, 16]  # stored widths, not head_dim
    assert [m[1].shape[-1] for m in states.mids] == [16, 8]

    def refuse(*a, **k):
        raise AssertionError("the fused path decoded the body")

    monkeypatch.setattr(TokenStore, "decoded", refuse)
    monkeypatch.setattr(TokenStore, "middle", refuse)
    monkeypatch.setattr(Fp16, "decode", refuse)
    monkeypatch.setattr(IntQuant, "decode", refuse)
    out, _ = states.attend(_Module(zmodel.model.layers[0].self_attn.zdc_qk), torch.randn(2, 4, 1, 16), None)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["zdc-50", "zdc-adaptive-50+int4", "zdc-adaptive-75+int3:window=5"])
def test_generation_fused_equals_pytorch_attention(zmodel, name):
    ids = torch.randint(3, 128, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    outs = []
    for attend in ("fused", "decode"):
        cache = from_method(f"{name}:block=16:attend={attend}", zmodel)
        assert cache.attend == attend
        with torch.no_grad():
            outs.append(zmodel.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=30,
                                        do_sample=False, output_scores=True, return_dict_in_generate=True,
                                        pad_token_id=0))
        assert cache.layers[0].kernel_reads == (attend == "fused")
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_codes_the_kernel_cannot_read_go_to_pytorch_and_say_so(zmodel):
    ranks = zdc.ZdcRanks(torch.tensor([[3, 8]] * 2), torch.tensor([[8, 8]] * 2), sink_rank=16)
    cache = ZdcCache(zmodel, ranks, IntQuant(3, "channel", 8), IntQuant(3, "token"), block=8)  # 3 x 3 bits: no flat unpack
    assert "no compiled kernel reads these codes" in cache.describe()
    with torch.no_grad():
        zmodel(torch.randint(3, 128, (1, 30)), past_key_values=cache)
    layer = cache.layers[0]
    assert not layer.kernel_reads
    states, _ = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert isinstance(states, ZdcStates)
    assert "numba kernel on the CPU, Triton on CUDA" in from_method("zdc-50", zmodel).describe()
    assert "decoded segments (PyTorch)" in from_method("zdc-50:attend=decode", zmodel).describe()


def test_thaw_moves_the_stage_into_float16_tokens_once():
    g = torch.Generator().manual_seed(0)
    store = TokenStore(IntQuant(4, "channel", 8), 0, 0, 8, IntQuant(8, "token"))
    x = torch.randn(1, 1, 21, 16, generator=g)
    store.init(x)
    store.append(x)
    assert store.tokens_in(store.body) == 16 and store.tokens_in(store.stage) == 5
    before = store.decoded(torch.float32)
    store.thaw()
    assert store.stage is None and store.fresh.shape[-2] == 5 and len(store) == 21
    after = store.decoded(torch.float32)
    assert torch.equal(after[..., :16, :], before[..., :16, :])  # the body is untouched
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)  # the stage's values, rounded to float16
    assert store.nbytes() == sum(t.numel() * t.element_size() for t in store.tensors())
    store.thaw()  # nothing staged: nothing changes
    assert torch.equal(store.decoded(torch.float32), after)
    store.append(torch.randn(1, 1, 3, 16, generator=g).half(), defer=True, checked=True)  # completes the block with them
    assert store.tokens_in(store.body) == 24 and store.fresh.shape[-2] == 0


def test_a_window_needs_sink_rank_at_least_every_rank(zmodel):
    ranks = zdc.ZdcRanks(torch.tensor([[8, 16]] * 2), torch.tensor([[8, 8]] * 2), sink_rank=8)
    with pytest.raises(KvshrinkError, match="sink_rank >= every rank"):
        ZdcCache(zmodel, ranks, Fp16(), window=4)
    ZdcCache(zmodel, ranks, Fp16(), window=0)  # no window: sink_rank is the sink tokens' alone
