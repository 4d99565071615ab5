"""ZDC low-rank: folding exactness, calibration files, real variable ranks, allocation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvshrink import KvshrinkError, from_method
from kvshrink.cli import main
from kvshrink.core.sensitivity import collect
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.lowrank.states import ZdcStates


def zdc_cache(model, pct, alloc="fisher", **options):
    """A ZDC cache at any budget (the registered names fix 50 and 75)."""
    return from_method("zdc-50", model, pct=pct, alloc=alloc, **options)


@pytest.fixture(scope="module")
def calib(tiny_model):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 48))
    return zdc.calibrate(tiny_model, ids, {"test": True})


@pytest.fixture(scope="module")
def zmodel(tiny_model, calib):
    return zdc.apply(tiny_model, calib)


def _chunks(model, cache, ids, step):
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], step):
            out.append(model(ids[:, s:s + step], past_key_values=cache).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("key_basis,value_basis", [("query", "output"), ("joint", "pca"), ("key", "pca")])
def test_full_rank_is_exact(tiny_model, key_basis, value_basis):
    torch.manual_seed(2)
    cal = zdc.calibrate(tiny_model, torch.randint(3, 128, (1, 40)), key_basis=key_basis, value_basis=value_basis)
    z = zdc.apply(tiny_model, cal)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        one = tiny_model(ids).logits
        z_one = z(ids, past_key_values=zdc_cache(z, 100, alloc="uniform")).logits
    assert (one - z_one).abs().max() < 1e-4  # one call: no stored token is read
    ref = _chunks(tiny_model, DynamicCache(), ids, 8)
    got = _chunks(z, zdc_cache(z, 100, alloc="uniform"), ids, 8)
    assert (ref - got).abs().max() < 2e-3  # float16 storage of the basis coordinates only


def test_apply_leaves_the_original_untouched(tiny_model, zmodel):
    assert tiny_model is not zmodel
    assert getattr(tiny_model, "kvshrink_zdc", None) is None
    assert not hasattr(tiny_model.model.layers[0].self_attn, "kvshrink_needs_cache")
    assert not torch.equal(tiny_model.model.layers[0].self_attn.v_proj.weight,
                           zmodel.model.layers[0].self_attn.v_proj.weight)


def test_variable_ranks_are_stored_for_real(zmodel, calib):
    ranks = zdc.ZdcRanks(torch.tensor([[2, 7], [16, 3]]), torch.tensor([[5, 1], [9, 16]]), sink_rank=16)
    from kvshrink.codecs.base import Fp16
    from kvshrink.families.lowrank.cache import ZdcCache

    cache = ZdcCache(zmodel, ranks, Fp16(), sink=4, block=8)
    ids = torch.randint(3, 128, (2, 37))
    _chunks(zmodel, cache, ids, 10)
    t, b = 37, 2
    expect = 0
    for i in range(2):
        expect += 2 * (b * 2 * 4 * 16) * 2  # sink tokens: keys and values, 2 heads, sink_rank coordinates
        expect += sum(ranks.k[i].tolist() + ranks.v[i].tolist()) * b * (t - 4) * 2
    expect += ranks.k.nbytes + ranks.v.nbytes  # the rank table the layout is read with
    assert cache.nbytes() == expect
    assert cache.fp16_nbytes() == 2 * 2 * b * 2 * t * 16 * 2


@pytest.mark.parametrize("window", [0, 3])
def test_attention_gets_stored_widths_only(zmodel, window):
    ranks = zdc.ZdcRanks(torch.tensor([[4, 6], [4, 6]]), torch.tensor([[8, 2], [8, 2]]), sink_rank=12)
    from kvshrink.codecs.base import Fp16
    from kvshrink.families.lowrank.cache import ZdcCache

    cache = ZdcCache(zmodel, ranks, Fp16(), sink=2, window=window, block=4, attend="decode")  # PyTorch segments
    ids = torch.randint(3, 128, (1, 20))
    _chunks(zmodel, cache, ids, 5)
    layer = cache.layers[0]
    k = torch.randn(1, 2, 1, 16)
    states, _ = layer.update(k, torch.randn(1, 2, 1, 16))
    assert isinstance(states, ZdcStates) and states.length == 21
    for h, segs in enumerate(states.heads):
        widths = [(s.keys.shape[-1], s.values.shape[-1], s.keys.shape[1]) for s in segs]
        body = (ranks.k[0, h].item(), ranks.v[0, h].item(), 18 - window)
        win = [(12, 12, window)] if window else []
        assert widths == [(12, 12, 2), body, *win, (16, 16, 1)]
    held = sum(t.numel() * t.element_size() for t in layer.tensors())
    assert layer.nbytes() == held


def test_fill_reference_matches_prefill_through_the_cache(tiny_model, zmodel):
    from kvshrink.eval.needle import fill, prefill_states

    ids = torch.randint(3, 128, (1, 30))
    a, b = zdc_cache(zmodel, 50), zdc_cache(zmodel, 50)
    with torch.no_grad():
        zmodel(ids, past_key_values=a)
    fill(b, prefill_states(tiny_model, ids))
    nxt = torch.randint(3, 128, (1, 3))
    with torch.no_grad():
        la, lb = zmodel(nxt, past_key_values=a).logits, zmodel(nxt, past_key_values=b).logits
    assert (la - lb).abs().max() < 1e-3


@pytest.mark.parametrize("window,cut", [(0, -15), (6, -15), (6, -3)])
def test_crop_then_continue_matches_a_fresh_cache(zmodel, window, cut):
    ids = torch.randint(3, 128, (1, 40))
    a, b = zdc_cache(zmodel, 50, block=8, window=window), zdc_cache(zmodel, 50, block=8, window=window)
    _chunks(zmodel, a, ids, 8)
    a.crop(cut)
    keep = 40 + cut
    assert a.get_seq_length() == keep
    if window:
        # a cut shortens the window (or drops it); kept tokens stay at the widths they were stored with
        assert all(s.window.shape[-2] == max(window + cut, 0) for s in a.layers[0].ks + a.layers[0].vs)
        _chunks(zmodel, a, torch.randint(3, 128, (1, 4)), 4)
        assert a.get_seq_length() == keep + 4
        return
    full = keep // 8 * 8
    _chunks(zmodel, b, ids[:, :full], 8)  # the same calls up to the cut
    _chunks(zmodel, b, ids[:, full:keep], 8)
    nxt = torch.randint(3, 128, (1, 4))
    assert (_chunks(zmodel, a, nxt, 4) - _chunks(zmodel, b, nxt, 4)).abs().max() < 1e-4
    assert a.nbytes() == b.nbytes()


def test_composition_with_int4_is_smaller_and_close(zmodel):
    ids = torch.randint(3, 128, (1, 64))
    plain, quant = zdc_cache(zmodel, 50, block=16), zdc_cache(zmodel, 50, bits=4, block=16)
    lp, lq = _chunks(zmodel, plain, ids, 16), _chunks(zmodel, quant, ids, 16)
    assert quant.nbytes() < 0.6 * plain.nbytes()  # rank-8 heads: int4 scales weigh as much as the codes
    kl = torch.nn.functional.kl_div(lq.log_softmax(-1), lp.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 0.05


def test_generate_with_left_padding_matches_single(zmodel):
    a = torch.randint(3, 128, (1, 12))
    b = torch.randint(3, 128, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = zmodel.generate(batch, attention_mask=mask, past_key_values=zdc_cache(zmodel, 75, sink=0), **kw)
        one = zmodel.generate(b, attention_mask=torch.ones_like(b), past_key_values=zdc_cache(zmodel, 75, sink=0), **kw)
    assert torch.equal(both[1, -6:], one[0, -6:])


def test_misuse_fails_loudly(tiny_model, zmodel):
    with pytest.raises(KvshrinkError, match="ZDC-transformed model"):
        from_method("zdc-50", tiny_model)
    with pytest.raises(KvshrinkError, match="needs its ZdcCache"):
        with torch.no_grad():
            zmodel(torch.randint(3, 128, (1, 5)), past_key_values=DynamicCache())
    with pytest.raises(KvshrinkError, match="already ZDC"):
        zdc.apply(zmodel, zmodel.kvshrink_zdc)
    cache = from_method("zdc-adaptive-50+int4:block=16", zmodel)
    assert 0.45 < cache.ranks.fraction(16) <= 0.5


def test_calibration_file_round_trip_and_refusals(tmp_path, tiny_model, calib):
    path = str(tmp_path / "c.safetensors")
    calib.save(path)
    back = zdc.ZdcCalibration.load(path, tiny_model)
    for name in ("uk", "uv", "qk", "vi", "fk", "fv"):
        assert torch.equal(getattr(back, name), getattr(calib, name))
    assert back.header["data"] == {"test": True}
    other_shape = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16))
    with pytest.raises(KvshrinkError, match="calibration file is for"):
        zdc.ZdcCalibration.load(path, other_shape)
    torch.manual_seed(5)
    same_shape = LlamaForCausalLM(tiny_model.config)
    with pytest.raises(KvshrinkError, match="other weights"):
        zdc.ZdcCalibration.load(path, same_shape)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a tensor file")
    with pytest.raises(KvshrinkError, match="not a safetensors file"):
        zdc.ZdcCalibration.load(str(bad))


def test_fisher_proxy_matches_brute_force():
    torch.manual_seed(3)
    x, g = torch.randn(50, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    u = torch.randn(8, 8, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    f = zdc._fisher(x, g, u, torch.linalg.inv(u).T)
    c = x @ u
    for r in range(9):
        kept = c.clone()
        kept[:, r:] = 0
        delta = kept @ torch.linalg.inv(u) - x
        assert torch.allclose(f[r], 0.5 * ((g * delta).sum(1) ** 2).sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.2, 0.9))
def test_allocation_respects_budget_and_beats_uniform_on_convex_costs(units, seed, frac):
    gen = torch.Generator().manual_seed(seed)
    d = 32
    # convex decreasing costs: scaled exponentials of different speeds
    r = torch.arange(d + 1, dtype=torch.float64)
    scale = torch.rand(units, 1, generator=gen, dtype=torch.float64) * 10
    speed = torch.rand(units, 1, generator=gen, dtype=torch.float64) * 0.3 + 0.02
    costs = scale * (torch.exp(-speed * r) - torch.exp(-speed * d))
    budget = int(frac * units * d) // 8 * 8
    if budget < 8 * units:
        return
    ranks = zdc.allocate(costs, budget, step=8, min_rank=8)
    assert int(ranks.sum()) <= budget and bool((ranks % 8 == 0).all())
    uniform = torch.full((units,), budget // units // 8 * 8)
    got = costs.gather(1, ranks[:, None]).sum()
    base = costs.gather(1, uniform[:, None]).sum()
    assert got <= base + 1e-9


def test_cli_calibrate_bad_input(capsys):
    assert main(["calibrate", "--method", "int4"]) == 2
    assert "no calibration for method" in capsys.readouterr().err


def test_bad_budget_and_options(calib):
    with pytest.raises(KvshrinkError, match="fraction of dimensions"):
        zdc.choose_ranks(calib, 1.5)
    with pytest.raises(KvshrinkError, match="unknown rank allocation"):
        zdc.choose_ranks(calib, 0.5, alloc="magic")
    with pytest.raises(KvshrinkError, match="unknown key basis"):
        zdc.calibrate(None, torch.zeros(1, 4, dtype=torch.long), key_basis="nope")


def test_bundled_model_full_rank_is_exact(bundled):
    model, tok = bundled
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids[:, :48]
    cal = zdc.calibrate(model, ids[:, :32])
    z = zdc.apply(model, cal)
    with torch.no_grad():
        ref = model(ids).logits
        got = z(ids, past_key_values=zdc_cache(z, 100, alloc="uniform")).logits
    assert (ref - got).abs().max() < 1e-3 * ref.abs().max()
    assert cal.header["shape"] == [30, 9, 3, 64]


@given(sequences=st.integers(1, 9), length=st.integers(1, 600), context=st.one_of(st.none(), st.integers(1, 9000)))
def test_calibration_sequences_spread_over_the_context(sequences, length, context):
    offsets = zdc.spread_offsets(sequences, length, context)
    assert len(offsets) == sequences and offsets[0] == 0 and offsets == sorted(offsets)
    if context is not None and context > length and sequences > 1:
        assert offsets[-1] + length == context  # the last sequence ends at the model's context
    else:
        assert set(offsets) == {0}


def test_collect_at_an_offset_turns_the_keys_and_changes_nothing_else(tiny_model):
    """Why spreading is sound: RoPE leaves values, gradients and queries-against-keys unchanged at any
    offset, while the post-RoPE keys the bases are fitted on turn as far into a context."""
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    here, far = (next(collect(tiny_model, ids, 2, offsets=off)) for off in ([0], [300]))
    for i in here:
        q0, k0, dk0, v0, dv0 = here[i]
        q1, k1, dk1, v1, dv1 = far[i]
        torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dv1, dv0, rtol=1e-3, atol=1e-6)
        assert not torch.allclose(k1, k0, atol=1e-3)  # turned by 300 positions
        half = k0.shape[-1] // 2  # each rotary pair (c, c + half) keeps its length
        pair = lambda k: k[..., :half] ** 2 + k[..., half:] ** 2  # noqa: E731
        torch.testing.assert_close(pair(k1), pair(k0), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(q1 @ k1.repeat_interleave(q1.shape[0] // k1.shape[0], 0).transpose(1, 2),
                                   q0 @ k0.repeat_interleave(q0.shape[0] // k0.shape[0], 0).transpose(1, 2),
                                   rtol=1e-3, atol=1e-4)


def test_a_calibration_records_where_its_sequences_sat(calib, tiny_model):
    assert calib.header["positions"] == zdc.spread_offsets(2, 48, tiny_model.config.max_position_embeddings)
    assert calib.header["positions"][-1] > 0
