"""Importance-aware ZDC (families/lowrank/important.py): a share of each head's tokens keeps every coordinate.

Properties:
- every token is held exactly once, at its head's rank or more: the leading coordinates of all that an importance-aware
  layer holds are those a plain ZDC layer of the same ranks holds, token for token; each head keeps round(share *
  left) high tokens at every coordinate, through a prompt and decode steps, with demotions among them;
- demotion never widens: a high token comes from the high class or the window, and one cut to the body never
  comes back;
- each class holds exactly its tensors' bytes (float16 coordinates, float32 scores, nothing else);
- the kernel's decode steps equal the decoded path's with both classes (and its scores, from its log-sum-exp, the
  decoded path's probabilities);
- what the layout cannot do refuses in one line;
- allocated shares: the measurement's round trip cuts exactly the coordinates the cache drops, the allocation is the
  least loss within the bytes of a uniform share (each layer weighted by what a high token costs there), and each
  layer keeps its allocated share.
"""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import KvshrinkError, from_method, get_method, load_cache
from kvshrink.codecs.base import Fp16
from kvshrink.eval.needle import fill, prefill_states
from kvshrink.families.lowrank import cache as zdc_cache
from kvshrink.families.lowrank import shares as zdc_shares
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.lowrank.cache import ZdcCache
from kvshrink.families.mixed import allocate

SHARE, WINDOW, GATHER = 0.1, 16, 16
MIX = "zdc-mix-50:gather=4:memory=8"  # leave often, forget fast: demotions within a short test


def _ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zmodel(tiny_model):
    torch.manual_seed(1)
    return zdc.apply(copy.deepcopy(tiny_model),
                     zdc.calibrate(tiny_model, torch.randint(3, 128, (2, 48)), {"test": True}))


@torch.no_grad()
def _feed(m, cache, ids, steps, seed=1, each=None):
    """A prompt, then decode steps of fixed tokens; each(cache) after every call."""
    out = [m(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
    for tok in _ids(steps, seed)[0]:
        if each:
            each(cache)
        out.append(m(tok.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.cat(out)


def _rows(x):
    """(n, w) -> the sorted list of its rows as tuples (a multiset of tokens, exact)."""
    return sorted(tuple(r) for r in x.tolist())


def test_every_token_is_held_once_at_its_rank_or_more(zmodel):
    """Layer 0's keys and values do not depend on the cache: an importance-aware layer and a plain one (the same
    ranks, share 0) hold the same tokens, compared at the head's rank; the high tokens keep every coordinate."""
    ids = _ids(150)
    mixed = from_method(MIX, zmodel)
    plain = ZdcCache(zmodel, mixed.ranks, Fp16(), sink=4, window=WINDOW)
    _feed(zmodel, mixed, ids, 40)
    _feed(zmodel, plain, ids, 40)
    lm, lp = mixed.layers[0], plain.layers[0]
    assert lm.demoted > 0 and lm.high_tokens() == round(SHARE * lm.left)
    assert lm.held() == lp.held() == 190
    for stores_m, stores_p, high, win in ((lm.ks, lp.ks, lm.hk, lm.wk), (lm.vs, lp.vs, lm.hv, lm.wv)):
        for h, (sm, sp) in enumerate(zip(stores_m, stores_p)):
            r = sm.body_width
            assert high.shape[-1] == win.shape[-1] == sm.dense_width > r  # the high class: every coordinate
            got = torch.cat([sm.sink[0, 0, :, :r], high[0, h, :, :r], sm.middle(torch.float16)[0, 0],
                             win[0, h, :, :r]])
            want = torch.cat([sp.sink[0, 0, :, :r], sp.middle(torch.float16)[0, 0], sp.window[0, 0, :, :r]])
            assert _rows(got) == _rows(want)


def _same_tokens(lm, lp):
    """An importance-aware layer and a plain one hold the same tokens, compared at each head's rank."""
    for stores_m, stores_p, high, win in ((lm.ks, lp.ks, lm.hk, lm.wk), (lm.vs, lp.vs, lm.hv, lm.wv)):
        for h, (sm, sp) in enumerate(zip(stores_m, stores_p)):
            r = sm.body_width
            got = [sm.sink[0, 0, :, :r], sm.middle(torch.float16)[0, 0], win[0, h, :, :r]]
            if high is not None:
                got.append(high[0, h, :, :r])
            want = torch.cat([sp.sink[0, 0, :, :r], sp.middle(torch.float16)[0, 0], sp.window[0, 0, :, :r]])
            assert _rows(torch.cat(got)) == _rows(want)


@settings(max_examples=12, deadline=None)
@given(steps=st.integers(0, 40), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=2), more=st.integers(0, 20),
       select=st.sampled_from(["attention", "random"]))
def test_a_crop_below_the_window_holds_each_token_before_the_cut_once(zmodel, steps, cuts, more, select):
    """Cuts below the window (each head re-balanced to the fewest high tokens any head holds before the cut, its
    surplus cut to its rank, its body tokens past the first any head drops taken out and back in), after decode steps
    and demotions, again after more steps: layer 0 holds exactly the tokens a plain layer cut at the same place
    holds, compared at the head's rank; every head as many high tokens, its most attended ones before the cut."""
    mixed = from_method(f"{MIX}:select={select}:crop=true", zmodel)
    plain = ZdcCache(zmodel, mixed.ranks, Fp16(), sink=4, window=WINDOW)
    for c in (mixed, plain):
        _feed(zmodel, c, _ids(150), steps)
    lm, lp = mixed.layers[0], plain.layers[0]
    for frac in cuts:
        cut = 1 + int(frac * (lm.held() - lm.window_count() - 2))  # below the window
        places, scores, drop = lm.hpos, lm.hscore, lm.held() - cut
        for c in (mixed, plain):
            c.crop(-drop)
        into = max(cut - 4, 0)
        assert lm.held() == lp.held() == cut and lm.window_count() == 0 and lm.left == into
        low = int((places < into).sum(2).min()) if places is not None else 0
        assert lm.high_tokens() == low
        if low and scores is not None:  # the most attended before the cut stay high
            stay = (lm.hpos[..., None] == places[..., None, :]).any(-2)
            assert bool((torch.where(stay, scores, torch.inf).amin(2)
                         >= torch.where((places < into) & ~stay, scores, -torch.inf).amax(2)).all())
        _same_tokens(lm, lp)
        for c in (mixed, plain):
            _feed(zmodel, c, _ids(1, seed=5), more)
        _same_tokens(lm, lp)


def test_demotion_never_widens(zmodel):
    """At every step each head's high tokens come from its high class or its window, and a token cut to the body
    is never high again."""
    cache = from_method(MIX, zmodel)
    layer = cache.layers[1]
    before, gone = {}, [set(), set()]

    def check(c):
        hk = layer.hk if layer.hk is not None else layer.wk[:, :, :0]
        first = not before
        for h in range(2):
            now = set(_rows(hk[0, h]))
            if not first:
                high, window = before[h]
                assert now <= high | window | set(_rows(layer.wk[0, h]))
                gone[h] |= high - now
                assert not now & gone[h]
            before[h] = (now, set(_rows(layer.wk[0, h])))

    _feed(zmodel, cache, _ids(120, seed=2), 60, each=check)
    check(cache)
    assert layer.demoted > 0 and all(gone)


def test_each_class_holds_its_tensors_bytes(zmodel):
    cache = from_method(MIX, zmodel)
    _feed(zmodel, cache, _ids(140, seed=3), 30)
    total = 0
    for layer in cache.layers:
        n_high, n_win = layer.high_tokens(), layer.wk.shape[2]
        w = layer.wk.shape[-1]
        for h, (ks, vs) in enumerate(zip(layer.ks, layer.vs)):
            n_body = len(ks) - ks.sink.shape[-2]
            assert n_body == len(vs) - vs.sink.shape[-2] == layer.held() - 4 - n_high - n_win
            total += 2 * (4 * w * 2 + n_body * (layer.rk[h] + layer.rv[h]))  # float16 sinks and bodies
        total += 2 * 2 * 2 * (n_high + n_win) * w  # float16 high class and window, keys and values, 2 heads
        total += 4 * 2 * (2 * n_win + n_high)  # float32: the window's sums and rows seen, the high tokens' scores
    assert cache.nbytes() == total + 8 * (cache.ranks.k.numel() + cache.ranks.v.numel())  # and the rank table
    assert cache.fp16_nbytes() / cache.nbytes() > 1.4


def test_kernel_equals_the_decoded_path_with_both_classes(zmodel):
    """Each step is taken twice on the same cache: by the kernel and by a copy that attends over the decoded
    segments. Logits, the window's observed attention and the high class's scores agree, and the same tokens
    leave to the same classes."""
    cache = from_method(MIX, zmodel)
    _feed(zmodel, cache, _ids(150, seed=4), 10)
    layer = cache.layers[1]
    assert layer.high_tokens() and layer.ks[0].fresh.shape[-2]  # both classes and float16 decode tokens
    differ = False
    with torch.no_grad():
        for tok in _ids(12, seed=5)[0]:
            other = cache.decoding_copy()
            a = zmodel(tok.view(1, 1), past_key_values=cache, use_cache=True).logits
            b = zmodel(tok.view(1, 1), past_key_values=other, use_cache=True).logits
            differ |= not torch.equal(a, b)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            for x, y in zip(cache.layers, other.layers):
                torch.testing.assert_close(x.wsum, y.wsum, rtol=1e-4, atol=1e-6)
                assert (x.hk is None) == (y.hk is None)
                if x.hk is not None:
                    assert torch.equal(x.hk, y.hk)
                    torch.testing.assert_close(x.hscore, y.hscore, rtol=1e-4, atol=1e-6)
    assert differ  # two paths really ran


def test_a_needle_fill_scores_the_window_with_the_captured_queries(zmodel):
    ids = _ids(100, seed=6)
    cache = from_method("zdc-mix-50", zmodel)
    fill(cache, prefill_states(zmodel, ids))
    for layer in cache.layers:
        assert layer.held() == 100 and layer.wk.shape[2] == WINDOW
        assert layer.high_tokens() == round(SHARE * (100 - 4 - WINDOW))
    with pytest.raises(KvshrinkError, match="captured queries"):
        fill(from_method("zdc-mix-50", zmodel), list(prefill_states(zmodel, ids)))


def test_what_the_layout_cannot_do_refuses_in_one_line(zmodel):
    cache = from_method("zdc-mix-50", zmodel)
    _feed(zmodel, cache, _ids(80, seed=7), 2)
    with pytest.raises(KvshrinkError, match="crops only within its observation window.*crop=true"):
        cache.crop(-(cache.layers[0].wk.shape[2] + 1))
    cache.crop(-3)  # within the window
    assert cache.get_seq_length() == 79
    with pytest.raises(KvshrinkError, match="sequence-parallel"):
        cache.exchange_form(0)
    assert get_method("zdc-mix-50").config.can_save and get_method("zdc-50").config.can_save
    for bad, why in (("zdc-mix-50:window=0", "window >= 1"), ("zdc-mix-50:share=2", "share must be"),
                     ("zdc-mix-50:share=0.5", "on average needs a share .* below 0.5")):
        with pytest.raises(KvshrinkError, match=why):
            get_method(bad)


def test_random_picks_keep_the_same_share_and_other_tokens(zmodel):
    """The ablation: the same quota, drawn at random (seeded), so other tokens than attention's picks."""
    ids = _ids(150, seed=8)
    picked = {}
    for select in ("attention", "random"):
        cache = from_method(f"{MIX}:select={select}", zmodel)
        _feed(zmodel, cache, ids, 20)
        layer = cache.layers[0]
        assert layer.high_tokens() == round(SHARE * layer.left)
        assert ("drawn at random" in cache.describe()) == (select == "random")
        picked[select] = set(_rows(layer.hk[0, 0]))
    assert picked["attention"] != picked["random"]


@pytest.mark.parametrize("attend", ["fused", "decode"])
def test_a_left_padded_row_never_sees_its_padding(zmodel, attend):
    """A row's masked padding is invisible on both paths: after a prompt and decode steps that move tokens into the
    high class, the row's logits do not depend on what the padding holds (the mask covers sink and body in their
    order; the high class sits after the body)."""
    pad, n = 20, 150
    real = _ids(n - pad, seed=9)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    logits = []
    for fill_id in (0, 77):
        batch = torch.cat([_ids(n, seed=10), torch.cat([torch.full((1, pad), fill_id), real], 1)])
        cache, am, out = from_method(f"{MIX}:attend={attend}", zmodel), mask, []
        with torch.no_grad():
            out.append(zmodel(batch, attention_mask=am, past_key_values=cache, use_cache=True).logits[1, -1])
            for tok in _ids(20, seed=11)[0]:
                am = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
                step = zmodel(tok.view(1, 1).expand(2, 1), attention_mask=am, past_key_values=cache, use_cache=True)
                out.append(step.logits[1, -1])
        assert cache.layers[1].high_tokens() > round(SHARE * (n - 4 - WINDOW))  # the high class grew while decoding
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_the_share_calibrations_round_trip_cuts_what_the_cache_drops(zmodel):
    """Keys turned into the head's basis keep their leading r coordinates and lose the rest unless kept; values (in
    basis coordinates already) likewise; the sink and the picked tokens come back unchanged."""
    calib = zmodel.kvshrink_zdc
    ranks = zdc.choose_ranks(calib, 0.44, "uniform")
    picked = torch.zeros(2, 40, dtype=torch.bool)
    picked[0, 10], picked[1, 30] = True, True
    trip = zdc_shares.trips(calib, ranks, sink=4)(1, picked)
    keep = picked.clone()
    keep[:, :4] = True
    x = torch.randn(1, 2, 40, D := calib.shape[-1], dtype=torch.float64)
    for name, into in (("key", calib.uk[1].double()), ("value", torch.eye(D, dtype=torch.float64).expand(2, D, D))):
        rank = (ranks.k if name == "key" else ranks.v)[1]
        y = trip[name](x)
        cx, cy = x[0] @ into, y[0] @ into
        for h in range(2):
            r = int(rank[h])
            torch.testing.assert_close(cy[h][:, :r], cx[h][:, :r], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cy[h][~keep[h], r:], torch.zeros_like(cy[h][~keep[h], r:]), rtol=0,
                                       atol=1e-5)
            torch.testing.assert_close(y[0, h][keep[h]], x[0, h][keep[h]], rtol=1e-5, atol=1e-5)
    assert zdc_shares.extra(ranks) == [2 * 2 * (D - int(ranks.k[0, 0]))] * 2


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_a_share_sweep_keeps_the_mean_dimensions(zmodel, share):
    """zdc-mix-50 sets the mean: at another share the other tokens' ranks follow, so the bytes stay those of
    50% of the dimensions (within a rank's rounding)."""
    cache = from_method(f"zdc-mix-50:share={share}", zmodel)
    d = zmodel.kvshrink_zdc.shape[-1]
    r = int(cache.ranks.k[0, 0])
    assert r == round((0.5 - share) / (1 - share) * d)
    assert abs(share * d + (1 - share) * r - d / 2) <= 0.5


@settings(max_examples=30, deadline=None)
@given(proxy=st.lists(st.floats(0, 1), min_size=15, max_size=15), share=st.sampled_from([0.05, 0.1, 0.2]),
       extra=st.lists(st.integers(1, 6), min_size=3, max_size=3))
def test_allocated_shares_weigh_each_layers_extra_bytes(proxy, share, extra):
    """With a high token costing `extra[i]` more in layer i, the allocation is the least summed loss whose extra
    bytes fit those of `share` everywhere (every combination of 3 layers' shares checked)."""
    calib = allocate.ShareCalibration(torch.tensor(proxy, dtype=torch.float64).view(3, 5),
                                      {"shares": list(allocate.SHARES)})
    got = allocate.choose(calib, share, extra)
    cap = share * sum(extra) + 1e-9
    table = calib.proxy.numpy()
    best = min(sum(table[i, j] for i, j in enumerate(js)) for js in itertools.product(range(5), repeat=3)
               if sum(allocate.SHARES[j] * e for j, e in zip(js, extra)) <= cap)
    assert sum(s * e for s, e in zip(got, extra)) <= cap
    assert sum(table[i, allocate.SHARES.index(s)] for i, s in enumerate(got)) == pytest.approx(best)


def test_a_zdc_share_calibration_sets_each_layers_share(zmodel, tmp_path, monkeypatch):
    """Measured on the transformed model; the cache then keeps each layer's allocated share through a prompt and
    decode steps. Without a file the method refuses in one line; a file names the ranks it was measured for (by a
    digest in its name and header) and its sink tokens."""
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path))
    monkeypatch.setattr(zdc_cache, "_SHARES", type(zdc_cache._SHARES)())
    name = "zdc-mix-50:shares=allocated:gather=4"
    with pytest.raises(KvshrinkError, match="need a share calibration"):
        from_method(name, zmodel)
    ranks = zdc.choose_ranks(zmodel.kvshrink_zdc, 0.44, "uniform")
    calib = zdc_shares.calibrate(zmodel, _ids(300, seed=12), ranks, data={"test": True})
    proxy = calib.proxy
    assert proxy.shape == (2, len(allocate.SHARES)) and bool((proxy >= 0).all())
    assert bool((proxy[:, -1] < proxy[:, 0]).all())  # 40% of the tokens at every coordinate lose less than none
    key = zdc_shares.digest(zmodel.kvshrink_zdc, ranks)
    calib.save(zdc_shares.default_path(zmodel, calib.header["data"], key))
    cache = from_method(name, zmodel)
    assert cache.layer_shares == allocate.choose(calib, 0.1, zdc_shares.extra(ranks))
    assert sum(cache.layer_shares) <= 0.2 + 1e-9
    _feed(zmodel, cache, _ids(150, seed=13), 20)
    for layer, share in zip(cache.layers, cache.layer_shares):
        assert layer.high_tokens() == round(share * layer.left)
    assert key != zdc_shares.digest(zmodel.kvshrink_zdc, zdc.choose_ranks(zmodel.kvshrink_zdc, 0.5, "uniform"))
    with pytest.raises(KvshrinkError, match="share calibration is for .*sink=4, not .*sink=2"):
        from_method(name + ":sink=2", zmodel)
    with pytest.raises(KvshrinkError, match="leave sink_rank unset"):
        get_method(name + ":sink_rank=32")
    with pytest.raises(KvshrinkError, match="give share > 0"):
        get_method("zdc-50:shares=allocated")
    path = str(tmp_path / "zdc.safetensors")  # a saved cache keeps its layers' shares: refused with other ones
    cache.save(path, zmodel)
    skewed = torch.tensor([[1.0, 0.9, 0.8, 0.0, 0.0], [0.0] * 5], dtype=torch.float64)  # layer 0 needs them all
    other = allocate.ShareCalibration(skewed, calib.header)
    assert allocate.choose(other, 0.1, zdc_shares.extra(ranks)) == [0.2, 0.0] != cache.layer_shares
    monkeypatch.setattr(zdc_cache, "_SHARES", type(zdc_cache._SHARES)())
    other.save(zdc_shares.default_path(zmodel, calib.header["data"], key))
    with pytest.raises(KvshrinkError, match="load it with the share calibration it was saved with"):
        load_cache(path, zmodel)


def test_a_saved_cache_resumes_with_its_classes_and_scores(zmodel, tmp_path):
    """Saved after decode steps with demotions, read back, it continues as the original: the same logits and the
    same high class through more rounds of leaving tokens."""
    cache = from_method(MIX, zmodel)
    _feed(zmodel, cache, _ids(150, seed=14), 13)
    path = str(tmp_path / "zdc.safetensors")
    assert cache.nbytes() < cache.save(path, zmodel) < cache.nbytes() + 64 * 1024
    loaded = load_cache(path, zmodel)
    assert torch.equal(_feed(zmodel, cache, _ids(3, seed=15), 20), _feed(zmodel, loaded, _ids(3, seed=15), 20))
    for x, y in zip(cache.layers, loaded.layers):
        assert x.left == y.left and x.demoted == y.demoted > 0 and torch.equal(x.hk, y.hk)
