"""Importance-aware int (families/mixed): two precision classes of tokens, picked by attention.

Properties:
- the tokens a head attends to most go to the high class, in that head only, and nowhere else;
- every head keeps exactly `share` of the tokens that left its window in the high class, through a prompt and
  decode steps, and each class holds exactly its codes' bytes (the high class: per-token codes, no more);
- the kernel's log-sum-exp gives the window the probabilities the decoded path computes, and its decode steps equal
  the decoded path on the same codes, with both classes read in place;
- what the layout cannot do refuses in one line.
"""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from kvshrink import KvshrinkError, from_method, get_method, load_cache, prepare
from kvshrink.codecs.quant import IntQuant
from kvshrink.core.importance import lse_probs
from kvshrink.eval.needle import fill, prefill_states
from kvshrink.families.mixed import allocate
from kvshrink.families.mixed import cache as mixed
from kvshrink.kernels import scores

D, H, G = 16, 2, 2  # head_dim, KV heads, query heads per KV head (the tiny model's)


def _ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return prepare(LlamaForCausalLM(copy.deepcopy(tiny_config)).eval(), "mix-int2")


@torch.no_grad()
def _steps(m, cache, ids, steps, seed=1):
    out = [m(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
    for tok in _ids(steps, seed)[0]:
        out.append(m(tok.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.cat(out)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(40, 300), hot=st.data(), seed=st.integers(0, 1000))
def test_the_most_attended_token_of_each_head_goes_high_there_only(model, n, hot, seed):
    """One token per head gets nearly all of its head's attention (its key along the queries); after the call it
    is in that head's high class, in no other head's, and in no low store."""
    cache = from_method("mix-int2", model)
    layer = cache.layers[0]
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, H, n, D, generator=gen) * 0.1, torch.randn(1, H, n, D, generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(H, D, generator=gen), dim=-1)
    picked = [hot.draw(st.integers(4, n - 17)) for _ in range(H)]  # past the sink, leaving the window
    for h, j in enumerate(picked):
        keys[0, h, j] = 6 * direction[h]
    states, _ = cache.update(keys, values, 0)
    query = (direction.repeat_interleave(G, 0)[None, :, None] * 8).expand(1, H * G, n, D)
    states.attend(None, query, None)
    high = layer.high.decode(layer.hk)  # (1, H, share of the leaving tokens, D)
    low = layer.k.decoded(torch.float32)
    for h, j in enumerate(picked):
        def near(x, key=keys[0, h, j]):
            return ((x - key).norm(dim=-1) < 2.0).sum().item()  # the key has norm 6, every other one about 0.4

        assert near(high[0, h]) == 1 and near(low[0, h]) == 0 and near(high[0, 1 - h]) == 0


def _hot(layer, keys):
    """Per head, which of the given hot keys (H, n, D; norm 6, 4 apart, every other key about 0.4) the high class and
    the low stores hold: (high, low) lists of index sets."""
    high = layer.high.decode(layer.hk) if layer.hk is not None else torch.zeros(1, H, 0, D)
    low = layer.k.decoded(torch.float32)
    where = []
    for held in (high, low):
        near = (held[0, :, None] - keys[:, :, None]).norm(dim=-1) < 1.5  # (H, n hot, held)
        where.append([set(near[h].any(-1).nonzero()[:, 0].tolist()) for h in range(H)])
    return where


@pytest.mark.parametrize("demote,window_bits", [(True, 16), (False, 16), (True, 4)])
def test_demotion_recodes_faded_tokens_down_and_never_back_up(model, demote, window_bits):
    """A prompt's attention picks 8 hot tokens per head; later calls of 16 tokens attend only to their 3 new hot tokens
    along another direction. With demotion, the faded ones leave the high class for the body, one way: a hot token once in the body
    never returns, and every hot token is in exactly one class. Without it, the first picks stay."""
    cache = from_method(f"mix-int2:demote={int(demote)}:memory=16:window_bits={window_bits}", model)
    layer, gen = cache.layers[0], torch.Generator().manual_seed(5)
    first, later = torch.nn.functional.normalize(torch.randn(2, D, generator=gen), dim=-1)
    n, calls = 100, 12
    keys, values = torch.randn(1, H, n, D, generator=gen) * 0.1, torch.randn(1, H, n, D, generator=gen)
    spots = torch.arange(10, 74, 8)  # 8 hot tokens per head, all leaving the window: share 0.1 of 84 keeps 8
    keys[0, :, spots] = 6 * torch.nn.functional.normalize(first + 0.6 * torch.randn(H, 8, D, generator=gen), dim=-1)
    hot = keys[0, :, spots]
    states, _ = cache.update(keys, values, 0)
    states.attend(None, (first * 8).expand(1, H * G, n, D), None)
    high, low = _hot(layer, hot)
    assert all(len(high[h]) == 8 and not low[h] for h in range(H))
    in_body = [set() for _ in range(H)]
    for _ in range(calls):
        k, v = torch.randn(1, H, 16, D, generator=gen) * 0.1, torch.randn(1, H, 16, D, generator=gen)
        k[0, :, 3:12:4] = 6 * later  # 3 new hot tokens per call, more than the quota grows by, found by the queries
        states, _ = cache.update(k, v, 0)
        states.attend(None, (later * 8).expand(1, H * G, 16, D), None)
        high, low = _hot(layer, hot)
        for h in range(H):
            assert not high[h] & low[h] and high[h] | low[h] == set(range(8))  # each in one class, none lost
            assert not in_body[h] & high[h]  # never re-coded up
            in_body[h] |= low[h]
    demoted = sum(len(b) for b in in_body)
    assert (demoted > 0) == demote and layer.high_tokens() == round(0.1 * layer.left)
    assert cache.demotions()[0] >= demoted / H  # the later hot tokens fade too


@pytest.mark.parametrize("share,window_bits", [(0.0, 16), (0.1, 16), (0.37, 16), (1.0, 16), (0.1, 4)])
def test_each_head_keeps_its_share_high_and_every_class_its_bytes(model, share, window_bits):
    cache = from_method(f"mix-int2:window_bits={window_bits}", model, share=share)
    _steps(model, cache, _ids(230), steps=40)
    high = cache.high
    per_token = D * high.bits // 8 + 4  # codes and a float16 (minimum, step) pair
    for layer in cache.layers:
        n = layer.window_count()
        assert layer.left == layer.held() - 4 - n  # all but sink and window left it
        assert layer.high_tokens() == round(share * layer.left)
        assert 16 <= n < 32  # the window, and fewer than `gather` tokens waiting to leave
        hi = sum(t.untyped_storage().nbytes() for p in (layer.hk, layer.hv) if p is not None
                 for t in p.tensors.values())
        assert hi == 2 * H * layer.high_tokens() * per_token
        # a coded window: the window's codes, then the float16 decode tokens since tokens last left (the tail)
        coded = layer.window_coded()
        assert coded == (0 if window_bits == 16 else 16)
        window = 2 * H * (coded * per_token + (n - coded) * D * 2) + 2 * H * n * 4  # and float32 scores
        scores = H * layer.high_tokens() * 4  # the high tokens' float32 moving averages (demotion)
        assert layer.hpos is None and layer.midx is None  # no places without crop=true
        assert layer.nbytes() == layer.k.nbytes() + layer.v.nbytes() + hi + window + scores
    assert cache.class_shares() == [pytest.approx(round(share * la.left) / la.left) for la in cache.layers]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), m=st.integers(1, 40), t=st.integers(1, 8), rows=st.integers(1, 8), cap=st.booleans(),
       rotate=st.booleans(), seed=st.integers(0, 2**16))
def test_the_compiled_window_scores_are_the_pytorch_ones(n, m, t, rows, cap, rotate, seed):
    """A decode step's window probabilities in one compiled call (kernels/scores.py) equal `lse_probs` over the
    decoded codes then the float16 tokens, the call's own t of them causal, with and without a soft-cap."""
    t, rows = min(t, m), min(rows, t, m)
    gen = torch.Generator().manual_seed(seed)
    codec = IntQuant(8, "token", rotate=rotate, seed=seed % 5)
    coded = codec.encode(torch.randn(2, H, n, D, generator=gen), 1) if n else None
    dense = torch.randn(2, H, m, D, generator=gen).half()
    q = torch.randn(2, H, G, rows, D, generator=gen)
    lse = torch.randn(2, H, G, rows, 1, generator=gen) + 3
    softcap = 5.0 if cap else None
    got = scores.probs(q, lse, softcap, dense, coded, codec)
    keys = dense.float() if coded is None else torch.cat([codec.decode(coded), dense.float()], 2)
    want = lse_probs(q, keys, lse, softcap, t)
    assert scores.reads(codec) and got.shape == want.shape == (2, H, G, rows, n + m)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)


def _records(packed, h):
    """Per token of head h, its codes and scales as one row of bytes."""
    return torch.cat([v[0, h].reshape(v.shape[2], -1).contiguous().view(torch.uint8)
                      for v in packed.tensors.values()], 1)


def test_a_coded_window_moves_its_codes_to_the_high_class_as_they_are(model):
    """With the window in the high class's codes, a token that goes high at a leaving step keeps the very codes it
    held in the window (no second coding, bit for bit), and the high class grows from the leaving tokens only."""
    cache = from_method("mix-int2:window_bits=4", model)
    _steps(model, cache, _ids(300, seed=9), steps=15)  # the step after the 16th leaves 16 tokens
    before = [(layer.hk, layer.wk, layer.window_count() - layer.window_size) for layer in cache.layers]
    assert all(out == 16 - 1 for *_, out in before)
    _steps(model, cache, _ids(1, seed=10), steps=0)
    grew = 0
    for layer, (hk, wk, _) in zip(cache.layers, before):
        assert layer.window_count() == layer.window_size
        for h in range(H):
            new, held = _records(layer.hk, h), _records(hk, h)
            leaving = _records(wk, h)[:16]
            pool = torch.cat([held, leaving])
            assert (new[:, None] == pool[None]).all(-1).any(1).all()  # every high token's codes, as they were
            grew += int((new[:, None] == leaving[None]).all(-1).any(1).sum())
    assert grew >= len(cache.layers) * H  # the quota grew by 1.6 a head: each head took leaving tokens


@pytest.mark.parametrize("window_bits", [16, 4])
def test_selecting_a_sequence_keeps_its_window_scores_and_classes(model, window_bits):
    """batch_select_indices (a generator's or a server's batch change) keeps one sequence's window, its scores and
    both classes: the next steps, across a leaving step, equal a cache that held that sequence alone."""
    name = f"mix-int2:window_bits={window_bits}"
    ids = torch.cat([_ids(120, seed=3), _ids(120, seed=4)])
    both, alone = from_method(name, model), from_method(name, model)
    with torch.no_grad():
        model(ids, past_key_values=both, use_cache=True)
        model(ids[1:], past_key_values=alone, use_cache=True)
    both.batch_select_indices(torch.tensor([1]))
    start = _ids(1, seed=5)
    torch.testing.assert_close(_steps(model, both, start, 20), _steps(model, alone, start, 20), rtol=1e-4, atol=1e-4)
    for a, b in zip(both.layers, alone.layers):
        torch.testing.assert_close(a.importance(), b.importance(), rtol=1e-4, atol=1e-6)
        assert a.high_tokens() == b.high_tokens() and a.nbytes() == b.nbytes()


def test_random_selection_keeps_the_bytes_and_picks_other_tokens(model):
    ids = _ids(230, seed=3)
    a, b = from_method("mix-int2", model), from_method("mix-int2:select=random", model)
    _steps(model, a, ids, steps=4)
    _steps(model, b, ids, steps=4)
    assert a.nbytes() == b.nbytes()
    assert not torch.equal(a.layers[1].hk.tensors["codes"], b.layers[1].hk.tensors["codes"])


def test_kernel_decode_steps_equal_the_decoded_path_and_score_alike(model):
    """On the same codes (a copy that decodes), decode steps give the same logits and the window the same
    observed attention: the kernel's log-sum-exp turns the window's logits into the decoded path's probabilities."""
    fused = from_method("mix-int2", model)
    _steps(model, fused, _ids(300, seed=4), steps=0)
    assert all(layer.k.body_tokens() and layer.hk is not None for layer in fused.layers)
    ref = fused.decoding_copy()
    more = _ids(20, seed=5)
    got, want = _steps(model, fused, more[:, :1], 19, seed=5), _steps(model, ref, more[:, :1], 19, seed=5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.layers, ref.layers):
        torch.testing.assert_close(a.importance(), b.importance(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.hscore, b.hscore, rtol=1e-4, atol=1e-6)  # the high class re-scored alike
        assert torch.equal(a.hk.tensors["codes"], b.hk.tensors["codes"])


@pytest.mark.parametrize("demote", [True, False])
def test_the_kernel_reads_both_classes_in_place(model, monkeypatch, demote):
    """A decode step over a coded body hands the int kernel the body, its stage and the high class; nothing of the
    coded history is decoded but, with demotion, the high class: its keys for their scores at the step after which
    tokens leave the window, and the tokens it demotes then (and a stage that fills a block is re-coded as ever)."""
    cache = from_method(f"mix-int2:demote={int(demote)}", model)
    _steps(model, cache, _ids(300, seed=6), steps=0)
    seen = []
    real = mixed.SplitStates

    def spy(before, body, after, **kw):
        seen.append((body.body_tokens, body.stage[0].num_tokens if body.stage else 0, body.window[0].num_tokens,
                     sum(x.shape[2] for x in after[0])))
        return real(before, body, after, **kw)

    monkeypatch.setattr(mixed, "SplitStates", spy)
    decoded, real_decode = [], type(cache.layers[0].k.codec).decode

    def decode(codec, packed, *a, **k):
        high = any(packed is layer.hk or packed is layer.hv for layer in cache.layers)
        if packed.block != 1 or (high and not demote):  # the body's blocks, or the high class without demotion
            pytest.fail("decoded the coded history")
        # a filled stage re-coded into a block, or the high class: its keys scored, its demoted tokens re-coded
        decoded.append(any(packed is layer.hk for layer in cache.layers))
        return real_decode(codec, packed, *a, **k)

    monkeypatch.setattr(type(cache.layers[0].k.codec), "decode", decode)
    _steps(model, cache, _ids(1, seed=7), steps=14)  # 15 steps: tokens leave the window after the 16th only
    layer = cache.layers[0]
    assert len(seen) == 15 * len(cache.layers) and not decoded
    body, stage, high, dense = seen[-1]
    assert (body, stage, high) == (layer.k.body_tokens(), layer.k.tokens_in(layer.k.stage), layer.high_tokens())
    assert dense == layer.wk.shape[2]
    _steps(model, cache, _ids(1, seed=8), steps=0)
    assert sum(decoded) >= (len(cache.layers) if demote else 0)  # the step they leave after scores the high class


def _decodes_as_fresh(model, name, cache, prompt, feed, mask=None):
    """After a crop, `cache` decodes `feed` (B, n) near a fresh cache of `name` prefilled with `prompt` (`mask`: the
    prompt's attention mask, ones after it)."""
    fresh = from_method(name, model)
    got, want = [], []
    with torch.no_grad():
        model(prompt, attention_mask=mask, past_key_values=fresh, use_cache=True)
        for i in range(feed.shape[1]):
            am = None if mask is None else torch.cat([mask, torch.ones(len(mask), i + 1, dtype=mask.dtype)], 1)
            for c, out in ((cache, got), (fresh, want)):
                out.append(model(feed[:, i:i + 1], attention_mask=am, past_key_values=c, use_cache=True).logits[:, -1])
    got, want = torch.stack(got, 1), torch.stack(want, 1)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("window_bits", [16, 6])
@pytest.mark.parametrize("cut", [150, 60, 2])
def test_a_crop_below_the_window_keeps_each_heads_tokens_before_the_cut(model, window_bits, cut):
    """Cut below the window of a batch of two after decode steps and demotions (each head of each sequence picked
    its own high tokens): layer 0 (whose keys do not depend on the cache) holds each token before the cut once, on
    every head, matched to the exact keys; every head keeps the fewest high tokens any head held before the cut,
    its most attended ones there, their codes bit for bit; the cache decodes on near a fresh prefill."""
    name = f"mix-int3:window_bits={window_bits}:gather=4:memory=8:crop=true"
    ids = torch.randint(3, 128, (2, 330), generator=torch.Generator().manual_seed(4))
    cache, exact = from_method(name, model), DynamicCache()
    with torch.no_grad():
        model(ids[:, :cut], past_key_values=exact, use_cache=True)
        model(ids[:, :300], past_key_values=cache, use_cache=True)
        for i in range(300, 330):  # decode steps: their tokens leave the window too, and demote high ones
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    assert all(la.demoted > 0 for la in cache.layers)
    before = [(la.hk, la.hpos.clone(), la.hscore.clone()) for la in cache.layers]
    cache.crop(-(330 - cut))
    assert cache.get_seq_length() == cut
    keys = cache.layers[0].dense()[0]  # sink, body, high class: the window is empty
    nearest = torch.cdist(keys, exact.layers[0].keys.float()).argmin(-1)  # (B, H, cut)
    assert all(sorted(row.tolist()) == list(range(cut)) for row in nearest.view(-1, cut))
    for la, (hk, hpos, hscore) in zip(cache.layers, before):
        into = max(cut - 4, 0)
        below = hpos < into
        lo = int(below.sum(2).min())
        assert la.held() == cut and la.window_count() == 0 and la.left == into and la.high_tokens() == lo
        if not lo:
            assert la.hk is None and la.hpos is None
            continue
        idx = (la.hpos[..., :, None] == hpos[..., None, :]).int().argmax(-1)  # each kept token's place before
        assert torch.equal(hpos.gather(2, idx), la.hpos) and bool((la.hpos < into).all())
        assert torch.equal(la.hk.tensors["codes"], hk.take(idx).tensors["codes"])
        gone = below.clone()
        gone.scatter_(2, idx, False)
        floor = torch.where(gone, hscore, -torch.inf).amax(2)
        assert bool((hscore.gather(2, idx).amin(2) >= floor).all())  # the most attended stay high
    _decodes_as_fresh(model, name, cache, ids[:, :cut], ids[:, :20])


@pytest.mark.parametrize("cut", [120, 30])
def test_a_crop_of_a_left_padded_batch_keeps_each_token_once_and_decodes_as_a_fresh_prefill(model, cut):
    """Sequence 0 starts with 40 masked pads (as a padded `generate` batch does); they take no attention, so they
    never go high, and a cut below the window (past the pads, or into them) still holds each token before it once on
    every head of layer 0, and decodes on near a fresh prefill of the same padded tokens."""
    name = "mix-int3:gather=4:memory=8:crop=true"
    ids = torch.randint(3, 128, (2, 290), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    cache, exact = from_method(name, model), DynamicCache()
    with torch.no_grad():
        model(ids[:, :cut], attention_mask=mask[:, :cut], past_key_values=exact, use_cache=True)
        model(ids[:, :260], attention_mask=mask[:, :260], past_key_values=cache, use_cache=True)
        for i in range(260, 290):
            model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True)
    assert all(la.demoted > 0 for la in cache.layers)
    # places count from the first token past the sink: no pad of sequence 0 is high on any head of any layer
    assert all(bool((la.hpos[0] >= 40 - 4).all()) for la in cache.layers)
    cache.crop(-(290 - cut))
    assert cache.get_seq_length() == cut and all(la.held() == cut for la in cache.layers)
    keys = cache.layers[0].dense()[0]
    nearest = torch.cdist(keys, exact.layers[0].keys.float()).argmin(-1)
    assert all(sorted(row.tolist()) == list(range(cut)) for row in nearest.view(-1, cut))  # pads included
    _decodes_as_fresh(model, name, cache, ids[:, :cut], ids[:, cut:cut + 20], mask[:, :cut])


@pytest.mark.parametrize("window_bits", [16, 4])
def test_what_the_layout_cannot_do_refuses_in_one_line(model, tiny_config, window_bits):
    cache = from_method(f"mix-int2:window_bits={window_bits}", model)
    _steps(model, cache, _ids(200), steps=0)
    with pytest.raises(KvshrinkError, match="crops only within its observation window.*crop=true"):
        cache.crop(-30)
    cache.crop(-3)  # within the window
    assert cache.get_seq_length() == 197
    _steps(model, cache, _ids(1, seed=3), steps=4)  # a coded window's tail holds them
    cache.crop(-2)
    assert cache.get_seq_length() == 200 and all(la.window_count() == 200 - 4 - la.left for la in cache.layers)
    for bad, what in (("mix-int2:high=2", "more bits"), ("mix-int2:share=1.5", "share"),
                      ("mix-int2:high=9", "impossible bit width"), ("mix-int2:select=norm", "unknown select")):
        with pytest.raises(KvshrinkError, match=what):
            get_method(bad)
    plain = LlamaForCausalLM(copy.deepcopy(tiny_config)).eval()
    with pytest.raises(KvshrinkError, match="kvshrink.prepare"):
        from_method("mix-int2", plain)
    sliding = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64)
    m = prepare(MistralForCausalLM(sliding).eval(), "mix-int2")
    with pytest.raises(KvshrinkError, match="no sliding-window layers"):
        from_method("mix-int2", m)


def test_a_fill_from_captured_queries_picks_what_a_prefill_through_the_cache_picks(model):
    """The needle bench fills caches from one uncompressed prefill and its last queries (eval/needle.py); the
    importance-aware cache scores its window from them exactly as its own prefill would."""
    ids = _ids(260, seed=8)
    through, filled = from_method("mix-int2", model), from_method("mix-int2", model)
    with torch.no_grad():
        model(ids, past_key_values=through, use_cache=True)
    fill(filled, prefill_states(model, ids))
    for a, b in zip(through.layers, filled.layers):
        assert a.high_tokens() == b.high_tokens() > 0
        torch.testing.assert_close(a.high.decode(a.hk), b.high.decode(b.hk), rtol=0, atol=1e-2)


def test_attention_picks_hold_more_of_the_observed_attention_than_random_ones(model):
    ids = _ids(400, seed=9)
    a, b = from_method("mix-int2", model), from_method("mix-int2:select=random", model)
    for c in (a, b):
        with torch.no_grad():
            model(ids, past_key_values=c, use_cache=True)
    for picked, drawn, share in zip(a.high_mass(), b.high_mass(), a.class_shares()):
        assert picked > max(drawn, share) and 0 < drawn < 1


@settings(max_examples=30, deadline=None)
@given(proxy=st.lists(st.floats(0, 1), min_size=15, max_size=15), share=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.4]))
def test_allocated_shares_are_the_least_loss_with_no_more_high_tokens(proxy, share):
    """The one-budget knapsack over (layer, share) against every combination of 3 layers' shares."""
    calib = allocate.ShareCalibration(torch.tensor(proxy, dtype=torch.float64).view(3, 5),
                                      {"shares": list(allocate.SHARES)})
    got = allocate.choose(calib, share)
    table = calib.proxy.numpy()
    best = min(sum(table[i, j] for i, j in enumerate(js)) for js in itertools.product(range(5), repeat=3)
               if sum(allocate.SHARES[j] for j in js) <= 3 * share + 1e-9)
    assert sum(got) <= 3 * share + 1e-9
    assert sum(table[i, allocate.SHARES.index(s)] for i, s in enumerate(got)) == pytest.approx(best)


def test_a_share_calibration_measures_every_layer_and_the_cache_keeps_each_layers_share(model, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path))
    monkeypatch.setattr(mixed, "_CALIBS", type(mixed._CALIBS)())
    name = "mix-int2:shares=allocated:block=32"
    with pytest.raises(KvshrinkError, match="need a share calibration"):
        from_method(name, model)
    calib = allocate.calibrate(model, _ids(300, seed=11), 2, 4, 32, True, data={"test": True})
    proxy = calib.proxy
    assert proxy.shape == (2, len(allocate.SHARES)) and bool((proxy >= 0).all())
    assert bool((proxy[:, -1] < proxy[:, 0]).all())  # 40% of the tokens at 4 bits lose less than none
    calib.save(allocate.default_path(model, calib.header["data"], 2, 4, 32, True))
    cache = from_method(name, model)
    assert cache.layer_shares == allocate.choose(calib, 0.1) and sum(cache.layer_shares) <= 0.2 + 1e-9
    _steps(model, cache, _ids(230), steps=20)
    for layer, share in zip(cache.layers, cache.layer_shares):
        assert layer.high_tokens() == round(share * layer.left)
    with pytest.raises(KvshrinkError, match="low=2, high=4, block=32, not low=3, high=6, block=32"):
        calib.check(model, "mix-int2", low=3, high=6, block=32)


@pytest.mark.parametrize("select", ["attention", "random"])
def test_a_saved_cache_resumes_with_its_classes_scores_and_draws(model, tmp_path, select):
    """Saved after decode steps (high class, window scores, demotions, and the random picks' generator) and read
    back, the cache continues as the original does through more rounds of leaving tokens: the same logits and the
    same high class, token for token; the file holds the cache's bytes and a header."""
    name = f"mix-int2:gather=4:memory=8:select={select}:crop=true"
    cache = from_method(name, model)
    _steps(model, cache, _ids(150, seed=20), steps=13)
    path = str(tmp_path / "mix.safetensors")
    size = cache.save(path, model)
    assert cache.nbytes() < size < cache.nbytes() + 64 * 1024
    loaded = load_cache(path, model)
    a, b = _steps(model, cache, _ids(3, seed=21), 20, seed=22), _steps(model, loaded, _ids(3, seed=21), 20, seed=22)
    assert torch.equal(a, b)
    for x, y in zip(cache.layers, loaded.layers):
        assert x.left == y.left and x.demoted == y.demoted > 0
        assert all(torch.equal(x.hk.tensors[k], y.hk.tensors[k]) for k in x.hk.tensors)
        assert torch.equal(x.hpos, y.hpos)
    for c in (cache, loaded):  # the places came back too: the same cut below the window
        c.crop(-60)
    assert torch.equal(_steps(model, cache, _ids(1, seed=23), 5), _steps(model, loaded, _ids(1, seed=23), 5))
