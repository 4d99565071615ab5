"""One budget for the whole cache (families/budget): the allocator, the calibration, the cache.

Properties:
- the knapsack's choice fits its budget, is never worse than any uniform choice that fits, and
  finds every solution that fits with its rounding slack (brute force on small cases);
- the calibration's bytes are the codecs' real bytes: after a prefill of `context` tokens the cache
  holds exactly the bytes the allocation expected, so the ratio a user names is the one measured;
- the cache's fused kernel equals its decode-then-attend path, per-layer widths and all;
- calibrations are checked against the model and block, and keyed by the corpus range.
"""

import copy
import itertools
import os

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from kvshrink import KvshrinkError, from_method, prepare
from kvshrink.attention.logits import recent_attention
from kvshrink.core.sensitivity import Perturbed, mean_kl
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget import joint as J
from kvshrink.families.budget import vector as V
from kvshrink.families.budget.cache import BudgetCache
from kvshrink.families.budget.config import BudgetConfig
from kvshrink.spec import spec_from_config


@settings(max_examples=60, deadline=None)
@given(items=st.integers(1, 4), choices=st.integers(1, 4), seed=st.integers(0, 10_000),
       share=st.floats(0.2, 1.2))
def test_knapsack_fits_and_beats_uniform_and_brute_force(items, choices, seed, share):
    rng = np.random.default_rng(seed)
    costs = [(rng.random(choices) * 10, rng.integers(1, 100, choices).astype(float)) for _ in range(items)]
    budget = share * sum(c[1].max() for c in costs)
    try:
        picks, total = A.allocate(costs, budget)
    except KvshrinkError as err:  # only when even the smallest choices do not fit
        assert sum(c[1].min() for c in costs) > budget - items * budget / A.CELLS and "\n" not in str(err)
        return
    assert sum(c[1][j] for c, j in zip(costs, picks)) <= budget + 1e-9
    assert total == pytest.approx(sum(c[0][j] for c, j in zip(costs, picks)))
    for j in range(choices):  # every uniform choice that fits
        if sum(c[1][j] for c in costs) <= budget:
            assert total <= sum(c[0][j] for c in costs) + 1e-9
    slack = budget - items * budget / A.CELLS  # a solution fitting this is never lost to rounding
    for combo in itertools.product(range(choices), repeat=items):
        if sum(c[1][j] for c, j in zip(costs, combo)) <= slack:
            assert total <= sum(c[0][j] for c, j in zip(costs, combo)) + 1e-9


def test_calibration_measures_every_choice(calibrated, tiny_model):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    n_layers, h, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    assert calib.proxy_k.shape == (n_layers, len(A.KEY_MENU)) and calib.proxy_v.shape == (n_layers, len(A.VALUE_MENU))
    for j, (bits, rotate, group, _) in enumerate(A.VALUE_MENU):  # groups of 32 do not fit a head of 16
        assert torch.isfinite(calib.proxy_v[:, j]).all() == (group is None)
    for j, (bits, _, group, _, _) in enumerate(A.KEY_MENU):  # key groups of 64 do not fit a block of 32
        assert torch.isfinite(calib.proxy_k[:, j]).all() == (group is None)
        if group is None:  # packed codes plus a float16 step and minimum (or mean and deviation) per group
            assert torch.allclose(calib.bytes_k[:, j], torch.tensor(h * (d * bits / 8 + 4 * d / 32),
                                                                    dtype=torch.float64))
            # a staged key token: per-token codes two bits wider (at most 8) and a float16 step and minimum
            assert A.stage_bytes(A.KEY_MENU[j], 32, spec) == h * (d * min(8, bits + 2) / 8 + 4.0)
    one, eight = (A.KEY_MENU.index((b, False, None, "uniform", False)) for b in (1, 8))
    assert (calib.proxy_k[:, eight] < calib.proxy_k[:, one]).all()  # more bits, less loss
    for bits in (2, 6):  # keys turned back within groups: the same bytes, their own (measured or scaled) loss
        plain, turned = (A.KEY_MENU.index((bits, True, None, "uniform", t)) for t in (False, True))
        assert torch.equal(calib.bytes_k[:, turned], calib.bytes_k[:, plain])
        assert (calib.proxy_k[:, turned] != calib.proxy_k[:, plain]).any() and (calib.proxy_k[:, turned] >= 0).all()
    one, three = A.VALUE_MENU.index((1, True, None, "uniform")), A.VALUE_MENU.index((3, True, None, "uniform"))
    assert (calib.proxy_v[:, three] < calib.proxy_v[:, one]).all() and (calib.proxy_v[:, three] > 0).all()
    gauss = A.VALUE_MENU.index((2, True, None, "gauss"))  # one 8-bit scale (the RMS): 3 bytes a token and head fewer
    uni = A.VALUE_MENU.index((2, True, None, "uniform"))
    assert torch.equal(calib.bytes_v[:, gauss], calib.bytes_v[:, uni] - 3 * h)
    assert (calib.proxy_v[:, gauss] != calib.proxy_v[:, uni]).all() and (calib.proxy_v[:, gauss] > 0).all()


def test_perturbed_kl_is_zero_unchanged_and_grows_with_the_error(tiny_model):
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    perturbed = Perturbed(tiny_model, ids)
    assert perturbed.kl(0, "key", lambda x: x) == 0.0
    small, large = (perturbed.kl(1, "value", lambda x, s=s: x + s * torch.randn_like(x)) for s in (0.01, 1.0))
    assert 0 < small < large
    # replaying the layers before the perturbed one gives what running them again gives
    full = Perturbed(tiny_model, ids, replay=False)
    assert perturbed.layers is not None and full.layers is None
    for layer in range(tiny_model.config.num_hidden_layers):
        trip = lambda x: x + 0.1 * torch.sin(x * 7)  # noqa: E731 (the same change in both)
        assert perturbed.kl(layer, "key", trip) == pytest.approx(full.kl(layer, "key", trip), rel=1e-5, abs=1e-9)
    assert perturbed.kl(0, "key", lambda x: x) == 0.0 and "forward" not in vars(tiny_model.model.layers[0])
    both = {1: ("key", trip), 0: ("value", trip)}  # several layers at once, replaying up to the first
    assert perturbed.kl_many(both) == pytest.approx(full.kl_many(both), rel=1e-5, abs=1e-9)
    assert perturbed.kl_many(both) != pytest.approx(perturbed.kl(1, "key", trip), rel=1e-3)
    # a layer's keys and values changed together: more than either alone
    pair = perturbed.kl_many({1: {"key": trip, "value": trip}})
    assert pair > max(perturbed.kl(1, "key", trip), perturbed.kl(1, "value", trip))
    # a long sequence is scored at evenly spaced positions: the same log-probabilities there, the last included
    spaced = Perturbed(tiny_model, ids, most=16)
    torch.testing.assert_close(spaced.ref, perturbed.ref[:, 3::4], rtol=1e-9, atol=1e-9)
    assert spaced.ref.shape[1] == 16 and 0 < spaced.kl(1, "key", trip) != pytest.approx(perturbed.kl(1, "key", trip))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), positions=st.integers(1, 70), vocab=st.integers(2, 50), rows=st.integers(1, 40),
       scale=st.floats(0.0, 30.0), seed=st.integers(0, 10_000))
def test_mean_kl_a_few_rows_at_a_time_equals_the_whole_tensor_formula(batch, positions, vocab, rows, scale, seed):
    """The calibration's KL, computed in slices of rows (any slice size, a last partial one included), equals
    KL(p || q) averaged over positions in one float64 expression; 0 for the same distribution, else positive."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(scale * torch.randn(batch, positions, vocab, generator=g, dtype=torch.float64), -1)
    logits = (scale * torch.randn(batch, positions, vocab, generator=g)).float()
    logq = torch.log_softmax(logits.double(), -1)
    whole = float((ref.exp() * (ref - logq)).sum(-1).mean())
    assert mean_kl(ref, logits, rows) == pytest.approx(whole, rel=1e-12, abs=1e-15)
    assert mean_kl(ref, ref.float(), rows) == pytest.approx(float((ref.exp() * (ref - torch.log_softmax(
        ref.float().double(), -1))).sum(-1).mean()), rel=1e-12, abs=1e-15)
    if scale > 0.01:  # two draws this far apart differ
        assert mean_kl(ref, logits, rows) > 0


def test_recent_attention_reads_the_nearest_positions_unchanged_and_the_rest_changed():
    """Each query reads the `recent` positions before it (and its own) from key/value, older ones from the changed
    key_hat/value_hat: checked against attention written out query by query."""
    g = torch.Generator().manual_seed(0)
    q, k, v, kh, vh = (torch.randn(1, h, 12, 8, generator=g) for h in (4, 2, 2, 2, 2))
    out, _ = recent_attention(None, q, k, v, kh, vh, None, 3)
    for t in range(12):
        for head in range(4):
            kv = head // 2  # GQA: two query heads a KV head
            keys = torch.stack([(kh if s < t - 3 else k)[0, kv, s] for s in range(t + 1)])
            vals = torch.stack([(vh if s < t - 3 else v)[0, kv, s] for s in range(t + 1)])
            p = torch.softmax(keys @ q[0, head, t] / 8 ** 0.5, 0)
            torch.testing.assert_close(out[0, t, head], p @ vals, rtol=1e-5, atol=1e-5)


def test_perturbed_with_recent_positions_unchanged(tiny_model):
    """A query whose every earlier position is recent sees no change; the nearer positions kept, the less KL."""
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    trip = lambda x: x + 0.3 * torch.sin(x * 7)  # noqa: E731
    kl = [Perturbed(tiny_model, ids, recent=r).kl(1, "value", trip) for r in (0, 8, 32, 64)]
    assert kl[3] == pytest.approx(0.0, abs=1e-12) and kl[0] > kl[1] > kl[2] > 0
    assert kl[0] == Perturbed(tiny_model, ids).kl(1, "value", trip)  # 0: every position changed, as before


@pytest.mark.parametrize("ratio,window", [(3.0, ""), (4.0, ""), (5.0, ""), (4.0, ":window=8"),
                                          (4.0, ":window=8:window_bits=16"), (5.0, ":window=20:window_bits=4")])
def test_cache_holds_the_bytes_the_allocation_expects(calibrated, tiny_model, monkeypatch, ratio, window):
    """A recent window (8-bit codes by default, float16 at 16 bits) is paid for from the same budget."""
    _, path = calibrated
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    cache = from_method(f"auto:budget={ratio}:block=32:context=160{window}", model)
    assert cache.allocation.ratio >= ratio
    ids = torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in range(0, 160, 16):  # a chunked prefill, as the bench's perplexity runs
            model(ids[:, s:s + 16], past_key_values=cache, use_cache=True)
    assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(cache.allocation.ratio, rel=1e-9)
    assert "bits per layer for keys" in cache.describe() and path in cache.describe()
    spec = spec_from_config(model.config)
    for i, layer in enumerate(cache.layers):
        _, w, coded, staged = A.held_tokens(spec, i, 160, 4, 32, cache.window)
        assert (layer.k.window_tokens(), layer.k.body_tokens(), layer.k.tokens_in(layer.k.stage)) == (w, coded, staged)
    if cache.window:
        assert f"window {cache.window}" in cache.describe()
        if "bits=16" not in window:  # the window holds codes, not float16 tokens: fewer bytes than their float16
            assert layer.v.window.nbytes() < cache.window * 2 * spec.num_kv_heads * spec.head_dim


def test_a_hybrid_sliding_model_holds_the_bytes_expected_and_calibrates_at_the_ratios_context(tiny_model, tmp_path,
                                                                                                 monkeypatch):
    # Gemma 3's layout: sliding layers (no sink, whole blocks freed past the window) beside a full one
    config = transformers.Gemma3TextConfig(vocab_size=128, num_hidden_layers=2, hidden_size=64, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=40,
                                           layer_types=["sliding_attention", "full_attention"],
                                           max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    spec = spec_from_config(model.config)
    assert A.calibration_shape(spec) == (2, 2048) and A.calibration_shape(spec_from_config(tiny_model.config)) == (4, 512)
    ids = torch.randint(3, 128, (1, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "auto.safetensors")
    A.calibrate(model, ids, {"test": True}, sink=4, block=32).save(path)
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(model, "auto:block=32")
    for context in (38, 100, 150, 171):  # within the window, then 39 to 70 tokens held by the sliding layer
        cache = from_method(f"auto:budget=4:block=32:context={context}", model)
        run = torch.randint(3, 128, (1, context), generator=torch.Generator().manual_seed(context))
        with torch.no_grad():  # a chunked prefill; the odd chunk first (a short chunk after it waits as decode steps do)
            cuts = sorted({0, *range(context % 16, context + 1, 16)})
            for s, e in itertools.pairwise(cuts):
                model(run[:, s:e], past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            assert sum(A.held_tokens(spec, i, context, 4, 32)) == layer.held()
        assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(cache.allocation.ratio, rel=1e-9)
        assert cache.allocation.ratio >= 4


def test_more_budget_never_raises_the_proxy(calibrated, tiny_model):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    proxies = [A.choose(calib, spec, r, 150, 4, 32).proxy for r in (2.0, 3.0, 4.0, 4.5, 5.0)]
    assert proxies == sorted(proxies)
    with pytest.raises(KvshrinkError, match="a ratio of 30x does not fit this model at 150 tokens") as err:
        A.choose(calib, spec, 30.0, 150, 4, 32)  # a head of 16: 1-bit codes and their scales reach about 5x
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("window", ["", ":window=8"])
def test_fused_kernel_equals_decode_then_attend(calibrated, tiny_model, monkeypatch, window):
    _, path = calibrated
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(2))
    outs = []
    for attend in ("fused", "decode"):
        cache = from_method(f"auto:budget=5:block=32:attend={attend}{window}", model)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(6)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_calibration_refuses_another_model_or_block(calibrated, tiny_model, tiny_config):
    _, path = calibrated
    torch.manual_seed(5)
    other = LlamaForCausalLM(copy.deepcopy(tiny_config)).eval()
    with pytest.raises(KvshrinkError, match="other weights"):
        A.BudgetCalibration.load(path, other)
    with pytest.raises(KvshrinkError, match="blocks of 32 tokens, not 64"):
        A.BudgetCalibration.load(path, tiny_model, 64)


def test_calibration_is_keyed_by_the_corpus_range(tiny_model):
    base = {"corpus_sha256": "a" * 16, "tokens": [100, 200], "sequences": 4, "length": 512}
    paths = {A.default_path(tiny_model, d, 128) for d in (base, {**base, "corpus_sha256": "b" * 16},
                                                           {**base, "tokens": [0, 100]})}
    assert len(paths) == 3 and A.default_path(tiny_model, base, 64) not in paths


def test_methods_need_their_calibration_and_a_sane_budget(tiny_model, monkeypatch):
    monkeypatch.delenv("KVSHRINK_AUTO_CALIBRATION", raising=False)
    with pytest.raises(KvshrinkError, match="need a budget calibration") as err:
        from_method("auto-6x", copy.deepcopy(tiny_model))
    assert "\n" not in str(err.value)
    with pytest.raises(KvshrinkError, match="budget must be a ratio"):
        from_method("auto:budget=0.5", tiny_model)
    with pytest.raises(KvshrinkError, match="window_bits must be 4, 5, 6, 8 or 16"):
        from_method("auto:window=8:window_bits=7", tiny_model)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_allocation_never_worse_than_uniform_widths_at_their_bytes(calibrated, tiny_model, bits):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    keys, values = (bits, False, None, "uniform", False), (bits, True, None, "uniform")
    items, fixed = A.layer_bytes(calib, spec, 150, 4, 32)
    held = fixed + sum(float(nbytes[(A.KEY_MENU if i % 2 == 0 else A.VALUE_MENU).index(keys if i % 2 == 0 else values)])
                       for i, (_, nbytes) in enumerate(items))
    ratio = spec.fp16_bytes(150) / held  # what uniform widths reach; 1% slack for the knapsack's rounding
    assert A.choose(calib, spec, 0.99 * ratio, 150, 4, 32).proxy <= A.uniform(calib, keys, values) + 1e-12


@settings(max_examples=60, deadline=None)
@given(w=st.lists(st.floats(1e-4, 1e3), min_size=4, max_size=32), halves=st.integers(1, 10),
       floor=st.sampled_from([0, 2]))
def test_joint_widths_fit_never_rise_and_beat_uniform(w, halves, floor):
    w, bits = sorted(w, reverse=True), halves / 2  # rates in halves, as J0.5, J1.5, J2.5
    if floor * len(w) > bits * len(w):
        with pytest.raises(KvshrinkError, match="cannot code"):
            J.spend(w, bits * len(w), floor)
        return
    b = J.spend(w, bits * len(w), floor)
    assert sum(b) <= bits * len(w) and b == sorted(b, reverse=True) and set(b) <= set(J.WIDTHS)
    assert floor == 0 or min(b) >= floor
    cost = sum(x * J.DIST[y] for x, y in zip(w, b))
    if bits in J.DIST:  # uniform widths are one feasible point
        assert cost <= sum(x * J.DIST[bits] for x in w) * (1 + 1e-9)
    # half a bit a channel more never costs more (the spend at the lower rate stays feasible)
    more = J.spend(w, (bits + 0.5) * len(w), floor)
    assert sum(x * J.DIST[y] for x, y in zip(w, more)) <= cost * (1 + 1e-9)


@pytest.fixture(scope="module")
def joint_calibrated(calibrated, tiny_model):
    ids = torch.randint(3, 128, (2, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    calib = J.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32, context=160)
    return calib


def test_joint_calibration_measures_each_choice(joint_calibrated, tiny_model):
    calib = joint_calibrated
    spec = spec_from_config(tiny_model.config)
    n_layers, h, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    assert calib.proxy.shape == (n_layers, len(J.CHOICES)) and (calib.proxy >= 0).all()
    assert calib.inverse.shape == (n_layers, h, d, d) and calib.inverse.dtype == torch.float16
    for j, (bits, floor) in enumerate(J.CHOICES):
        w = calib.widths[:, j]
        assert (w.sum(-1) <= bits * d).all() and (w[:, 1:] <= w[:, :-1]).all() and (w >= floor).all()
        # the widths' bits a token (nothing padded), a float16 min per axis and step per coded axis and block
        coded = (w > 0).sum(-1).double()
        assert torch.allclose(calib.bytes[:, j], h * (w.sum(-1).double() / 8 + 2 * (d + coded) / 32))
    two, four = J.CHOICES.index((2, 0)), J.CHOICES.index((4, 0))
    assert (calib.proxy[:, four] < calib.proxy[:, two]).all()  # more bits, less loss
    # the half-bit steps sit between their neighbours in bytes: the allocator's finer steps
    rates = sorted(b for b, f in J.CHOICES if f == 0)
    assert rates == [0.5, 1, 1.5, 2, 2.5, 3, 4]
    by_rate = [calib.bytes[:, J.CHOICES.index((r, 0))] for r in rates]
    assert all((a < b).all() for a, b in zip(by_rate, by_rate[1:]))


def test_joint_bases_average_the_queries_over_the_models_whole_context(tiny_model):
    """A basis from positions 0..511 only lost keys at later positions (auto-6x +7% perplexity at
    3,000-4,000 on the bundled model): its statistics now span the model's context."""
    ids = torch.randint(3, 128, (2, 4 + 32), generator=torch.Generator().manual_seed(0))
    calib = J.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32)
    assert calib.header["context"] == tiny_model.config.max_position_embeddings == 512
    assert calib.header["positions"] == [0, 512 - 36]  # the sequences' keys at spread positions too
    short = J.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32, context=64)
    assert short.header["context"] == 64 and not torch.equal(short.inverse, calib.inverse)


def test_joint_keys_at_one_bit_a_channel_only_where_offered(calibrated, joint_calibrated, tiny_model):
    """joint.ONE_BIT (`joint1`, on in auto-8x): most axes at their block's mean; the allocator takes it only where the
    configuration offers it, and offering it never raises the summed proxy."""
    calib = copy.copy(calibrated[0])
    calib.proxy_k = torch.where(torch.isfinite(calib.proxy_k), 1.0, calib.proxy_k)  # the menu's keys made costly
    joint = copy.copy(joint_calibrated)
    one, two = J.CHOICES.index(J.ONE_BIT), J.CHOICES.index((2, 0))
    joint.proxy = joint.proxy.clone()
    joint.proxy[:, one] = joint.proxy[:, two]  # as good as two bits, in fewer bytes
    joint.proxy[:, [j for j, c in enumerate(J.CHOICES) if c[0] % 1]] = float("inf")  # the half steps passed by
    spec = spec_from_config(tiny_model.config)
    w = joint.widths[:, one]
    assert (w.sum(-1) <= spec.head_dim).all() and (w == 0).any(-1).all() and (w[:, 0] >= 2).all()
    assert (joint.bytes[:, one] < joint.bytes[:, two]).all()
    off = A.choose(calib, spec, 3.0, 160, 4, 32, joint)
    on = A.choose(calib, spec, 3.0, 160, 4, 32, joint, joint1=True)
    picked = [[k[0] == A.JOINT and tuple(k[1:]) == J.ONE_BIT for k in a.keys] for a in (off, on)]
    assert not any(picked[0]) and any(picked[1]) and on.proxy <= off.proxy + 1e-12
    assert "J1" in on.describe()
    with pytest.raises(KvshrinkError, match="joint1=true offers a joint-basis key choice: it needs joint=true"):
        BudgetConfig(joint1=True).check()


def test_half_bit_joint_steps_are_taken_where_they_pay_and_never_raise_the_proxy(calibrated, joint_calibrated,
                                                                                 tiny_model):
    """J0.5, J1.5 and J2.5 (steps of half a bit between the others): the same budget with them passed by (their proxy
    infinite) never reaches a lower summed proxy than with them on offer, and where a half step is made lossless, the
    allocator takes it."""
    calib = copy.copy(calibrated[0])
    calib.proxy_k = torch.where(torch.isfinite(calib.proxy_k), 1.0, calib.proxy_k)  # the menu's keys made costly
    spec = spec_from_config(tiny_model.config)
    halves = [J.CHOICES.index(c) for c in J.CHOICES if c[0] % 1]
    assert [J.CHOICES[j] for j in halves] == [(0.5, 0), (1.5, 0), (2.5, 0)]
    without = copy.copy(joint_calibrated)
    without.proxy = joint_calibrated.proxy.clone()
    without.proxy[:, halves] = float("inf")
    cheap = copy.copy(joint_calibrated)
    cheap.proxy = torch.ones_like(joint_calibrated.proxy)  # as costly as the menu's keys
    cheap.proxy[:, J.CHOICES.index((1.5, 0))] = 0.0  # but J1.5 lossless: no key choice is better
    for ratio in (2.5, 3.0, 4.0):
        off = A.choose(calib, spec, ratio, 160, 4, 32, without, joint1=True)
        on = A.choose(calib, spec, ratio, 160, 4, 32, joint_calibrated, joint1=True)
        assert on.proxy <= off.proxy + 1e-12
        assert not any(k[0] == A.JOINT and k[1] % 1 for k in off.keys)
    taken = A.choose(calib, spec, 3.0, 160, 4, 32, cheap, joint1=True)
    assert all(tuple(k) == (A.JOINT, 1.5, 0) for k in taken.keys) and "J1.5" in taken.describe()


def test_cache_with_joint_keys_holds_the_bytes_expected_and_the_kernel_reads_them(calibrated, joint_calibrated,
                                                                                    tiny_model, monkeypatch):
    """Joint choices made cheap, so the allocation takes them in some layers: the cache then holds exactly the
    bytes expected (each layer's map back to keys included), and its fused decode equals decode-then-attend."""
    calib, path = calibrated
    calib = copy.copy(calib)
    calib.proxy_k = torch.where(torch.isfinite(calib.proxy_k), 1.0, calib.proxy_k)  # the menu's keys made costly
    spec = spec_from_config(tiny_model.config)
    chosen = A.choose(calib, spec, 3.0, 160, 4, 32, joint_calibrated)
    assert any(k[0] == A.JOINT for k in chosen.keys), chosen.describe()
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    ids = torch.randint(3, 128, (1, 170), generator=torch.Generator().manual_seed(1))
    outs = []
    for attend in ("fused", "decode"):
        cache = BudgetCache(model.config, chosen, path, 32, None, (joint_calibrated, "joint.safetensors"), sink=4,
                            window=0, attend=attend)
        with torch.no_grad():
            for s in range(0, 160, 16):
                model(ids[:, s:s + 16], past_key_values=cache, use_cache=True)
            if attend == "fused":
                assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(chosen.ratio, rel=1e-9)
                assert "J" in cache.describe() and "joint keys joint.safetensors" in cache.describe()
            steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(160, 170)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_joint_keys_are_asked_for_and_need_their_calibration(calibrated, joint_calibrated, tiny_model, monkeypatch,
                                                            tmp_path):
    _, path = calibrated
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    assert "menu keys only" in from_method("auto:budget=3:block=32:context=160", model).describe()
    with pytest.raises(KvshrinkError, match="joint=true needs a joint key calibration") as err:
        from_method("auto:budget=3:block=32:context=160:joint=true", model)
    assert "\n" not in str(err.value)
    joint_calibrated.save(J.path_beside(path))
    cache = from_method("auto:budget=3:block=32:context=160:joint=true", model)
    assert J.path_beside(path) in cache.describe()


@pytest.fixture(scope="module")
def vector_calibrated(tiny_model):
    ids = torch.randint(3, 128, (2, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    return V.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32)


def test_vector_calibration_measures_each_width(vector_calibrated, tiny_model):
    calib = vector_calibrated
    spec = spec_from_config(tiny_model.config)
    h, d = spec.num_kv_heads, spec.head_dim
    assert calib.proxy.shape == (spec.num_layers, len(V.CHOICES)) and (calib.proxy >= 0).all()
    assert calib.book1.shape == (256, 8) and calib.book2.shape == (256, 4)
    for j, bits in enumerate(V.CHOICES):  # a byte a run of coordinates, the mean and deviation a byte each
        expected = torch.full((spec.num_layers,), h * (d * bits / 8 + 2), dtype=torch.float64)
        assert torch.equal(calib.bytes[:, j], expected)
    assert (calib.proxy[:, 1] < calib.proxy[:, 0]).all()  # more bits, less loss
    assert calib.codec(2) is calib.codec(2) and torch.equal(calib.codec(1).book, calib.book1)


def test_vector_values_never_raise_the_proxy_and_the_cache_holds_their_bytes(calibrated, vector_calibrated,
                                                                             tiny_model, monkeypatch):
    """The menu's values made costly, so the allocation takes vector levels: offering them never raises the summed
    proxy; the cache holds the bytes expected (the allocation counts both codebooks, a cache the ones it uses);
    its fused decode equals decode-then-attend."""
    calib, path = calibrated
    calib = copy.copy(calib)
    calib.proxy_v = torch.where(torch.isfinite(calib.proxy_v), 1.0, calib.proxy_v)
    spec = spec_from_config(tiny_model.config)
    # 448 tokens: the codebooks (12 KB) are a tenth of the tiny model's float16 cache there, most of it at 160
    off = A.choose(calib, spec, 2.5, 448, 4, 32)
    chosen = A.choose(calib, spec, 2.5, 448, 4, 32, vector_calib=vector_calibrated)
    assert chosen.proxy <= off.proxy + 1e-12 and chosen.ratio >= 2.5
    assert all(v[0] == V.VECTOR for v in chosen.values), chosen.describe()
    assert "1v" in chosen.describe() or "2v" in chosen.describe()
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    ids = torch.randint(3, 128, (1, 458), generator=torch.Generator().manual_seed(1))
    books = {v[1] for v in chosen.values}
    outs = []
    for attend in ("fused", "decode"):
        cache = BudgetCache(model.config, chosen, path, 32, None, vectors=(vector_calibrated, "vq.safetensors"),
                            sink=4, window=0, attend=attend)
        with torch.no_grad():
            for s in range(0, 448, 64):
                model(ids[:, s:s + 64], past_key_values=cache, use_cache=True)
            if attend == "fused":
                unused = sum(getattr(vector_calibrated, f"book{b}").nbytes for b in V.CHOICES if b not in books)
                assert cache.fp16_nbytes() / (cache.nbytes() + unused) == pytest.approx(chosen.ratio, rel=1e-9)
                assert "vector value levels vq.safetensors" in cache.describe()
            steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(448, 458)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_vector_values_are_asked_for_and_need_their_calibration(calibrated, vector_calibrated, tiny_model,
                                                               monkeypatch):
    _, path = calibrated
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    assert "vector value levels" not in from_method("auto:budget=3:block=32:context=160", model).describe()
    with pytest.raises(KvshrinkError, match="vector=true needs a vector value calibration") as err:
        from_method("auto:budget=3:block=32:context=160:vector=true", model)
    assert "\n" not in str(err.value)
    vector_calibrated.save(V.path_beside(path))
    try:
        cache = from_method("auto:budget=2.5:block=32:context=448:vector=true", model)
        assert V.path_beside(path) in cache.describe()
        assert V.VectorCalibration.load(V.path_beside(path), model, 32).header["block"] == 32
        with pytest.raises(KvshrinkError, match="blocks of 32 tokens, not 64"):
            V.VectorCalibration.load(V.path_beside(path), model, 64)
    finally:
        os.remove(V.path_beside(path))
