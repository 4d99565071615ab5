"""A head axis for one budget (`heads=N`): layers held in KV-head groups (core/heads.py), each head's share of its
layer's loss (families/budget/heads.py), and the allocator's choice per head.

Properties:
- a layer split into head groups that all code alike attends, holds, crops and saves exactly as the whole layer;
- the per-head items sum to the layer's (proxy and bytes), so the per-layer allocation is one feasible point of the
  per-head problem: allocating per head is never worse on the objective (beyond the knapsack's rounding);
- a cache whose heads took different codecs holds the bytes its allocation expected, and its fused kernel equals
  decode-then-attend;
- the shares are measured per head (the measured head's KL, not the layer's), and bad options fail in one line.
"""

import copy
import shutil

import numpy as np
import pytest
import torch

from kvshrink import KvshrinkError, from_method, get_method, load_cache, prepare
from kvshrink.attention.split import SplitStates
from kvshrink.codecs.joint import JointKeys
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.rvq import RVQ
from kvshrink.core.calibfile import model_header
from kvshrink.core.heads import HeadGroups
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget import heads as H
from kvshrink.families.budget.cache import BudgetCache
from kvshrink.families.quant.cache import CompressedCache
from kvshrink.spec import spec_from_config


def _run(model, cache, ids, steps: int):
    """A chunked prefill of ids[:, :-steps], then `steps` decode steps: their logits."""
    n = ids.shape[1] - steps
    with torch.no_grad():
        for s in range(0, n, 16):
            model(ids[:, s:min(s + 16, n)], past_key_values=cache, use_cache=True)
        return torch.cat([model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                          for i in range(n, n + steps)], 1)


@pytest.mark.parametrize("attend", ["fused", "decode"])
def test_head_groups_of_one_codec_attend_hold_and_crop_as_the_whole_layer(tiny_model, attend, tmp_path):
    model = prepare(copy.deepcopy(tiny_model), "int4")
    kc = IntQuant(3, "channel", 32, rotate=True, seed=1)
    vc = IntQuant(2, "token", rotate=True, seed=2)
    whole = CompressedCache(model.config, layer_codecs=[(kc, vc)] * 2, block=32, attend=attend, method="int4")
    split = CompressedCache(model.config, layer_codecs=[[(0, 1, kc, vc), (1, 2, kc, vc)]] * 2, block=32,
                            attend=attend, method="int4")
    assert all(isinstance(layer, HeadGroups) for layer in split.layers)
    ids = torch.randint(3, 128, (2, 110), generator=torch.Generator().manual_seed(3))
    a, b = _run(model, whole, ids, 8), _run(model, split, ids, 8)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert split.nbytes() == whole.nbytes() and split.get_seq_length() == whole.get_seq_length() == 110
    assert not split.head_agnostic() and whole.head_agnostic()  # a head-sharded rank must not take groups
    for cache in (whole, split):
        cache.crop(-20)  # transformers passes the count on: negative, tokens to remove
    assert split.nbytes() == whole.nbytes() and split.get_seq_length() == 90
    more = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = (model(more, past_key_values=c, use_cache=True).logits for c in (whole, split))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_head_groups_refuse_heads_out_of_order():
    with pytest.raises(KvshrinkError, match="consecutive runs from head 0"):
        HeadGroups([object(), object()], [(0, 1), (2, 3)])
    with pytest.raises(KvshrinkError, match="cannot code a layer's KV heads apart"):
        RVQ(torch.randn(2, 4, 8)).heads(0, 1)  # a codec not declared alike on every head


def test_joint_keys_of_some_heads_code_them_as_the_whole_codec_and_hold_only_their_maps():
    h, d = 3, 16
    inverse = torch.linalg.qr(torch.randn(h, d, d, generator=torch.Generator().manual_seed(0)))[0]
    rope = tuple(10000.0 ** (-2 * i / d) for i in range(d // 2))
    whole = JointKeys(inverse, [4] * 4 + [3] * 4 + [2] * 4 + [0] * 4, 32, rope, 3)
    part = whole.heads(1, 3)
    x = torch.randn(2, h, 64, d, generator=torch.Generator().manual_seed(1))
    assert torch.equal(whole.decode(whole.encode(x, 32))[:, 1:3], part.decode(part.encode(x[:, 1:3].contiguous(), 32)))
    held = [sum(t.nbytes for t in c.shared_tensors()) for c in (whole, part)]
    assert held[1] * h == held[0] * 2
    assert IntQuant(2, "token").heads(0, 1).bits == 2


def _skewed(spec, heavy: int = 1, header: dict | None = None) -> H.HeadCalibration:
    """Shares where one head of every layer carries 90% of its keys' and values' loss."""
    kl = torch.full((spec.num_layers, spec.num_kv_heads), 0.1 / max(spec.num_kv_heads - 1, 1), dtype=torch.float64)
    kl[:, heavy] = 0.9
    return H.HeadCalibration(kl.clone(), kl.clone(), header or {})


def test_per_head_items_sum_to_the_layers_and_the_allocation_is_never_worse(calibrated, tiny_model):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    heads = _skewed(spec)
    items, _ = A.layer_bytes(calib, spec, 160, 4, 32)
    n = spec.num_kv_heads
    for j, (proxy, nbytes) in enumerate(items):
        mine = H.split_one((proxy, nbytes), heads, j // 2, "key" if j % 2 == 0 else "value")
        assert len(mine) == n
        finite = np.isfinite(proxy)
        np.testing.assert_allclose(sum(p for p, _ in mine)[finite], proxy[finite], rtol=1e-12)
        np.testing.assert_allclose(sum(b for _, b in mine), nbytes, rtol=1e-12)
    for ratio in (3.0, 4.0, 5.0):
        per_layer = A.choose(calib, spec, ratio * 1.02, 160, 4, 32)  # 2%: the knapsack rounds each head's bytes up
        per_head = A.choose(calib, spec, ratio, 160, 4, 32, head_calib=heads, head_layers=2)
        assert per_head.ratio >= ratio
        assert per_head.proxy <= per_layer.proxy * (1 + 1e-9)
    assert any(isinstance(k, list) for k in per_head.keys + per_head.values), per_head.describe()
    assert "|" in per_head.describe()
    assert A.choose(calib, spec, 4.0, 160, 4, 32, head_calib=heads, head_layers=0) == A.choose(calib, spec, 4.0, 160,
                                                                                               4, 32)


def test_only_the_layers_whose_loss_sits_most_in_one_head_are_allocated_per_head(calibrated, tiny_model):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    heads = _skewed(spec)
    heads.kl_k[0], heads.kl_v[0] = 0.5, 0.5  # layer 0's heads alike: nothing to gain by coding them apart
    assert H.most_concentrated(heads, 1) == [1] and H.most_concentrated(heads, 5) == [0, 1]
    chosen = A.choose(calib, spec, 4.0, 160, 4, 32, head_calib=heads, head_layers=1)
    assert not isinstance(chosen.keys[0], list) and not isinstance(chosen.values[0], list)


def test_a_cache_of_heads_apart_holds_the_bytes_expected_and_its_kernel_equals_decode(calibrated, tiny_model,
                                                                                       monkeypatch, tmp_path):
    calib, path = calibrated
    spec = spec_from_config(tiny_model.config)
    chosen = A.choose(calib, spec, 4.0, 160, 4, 32, head_calib=_skewed(spec), head_layers=2)
    split = [i for i, (k, v) in enumerate(zip(chosen.keys, chosen.values)) if isinstance(k, list)]
    assert split, chosen.describe()
    heavy = [k[1] if isinstance(k, list) else k for k in chosen.keys]
    light = [k[0] if isinstance(k, list) else k for k in chosen.keys]
    # the heavy head is given at least the bytes of the light one (its keys or values)
    assert any(a != b for a, b in zip(heavy, light)) or any(isinstance(v, list) for v in chosen.values)
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    ids = torch.randint(3, 128, (1, 170), generator=torch.Generator().manual_seed(1))
    outs = []
    for attend in ("fused", "decode"):
        cache = BudgetCache(model.config, chosen, path, 32, sink=4, window=0, attend=attend, method="auto")
        outs.append(_run(model, cache, ids, 10))
        if attend == "fused":
            assert all(isinstance(cache.layers[i], HeadGroups) for i in split)
            saved = cache
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    # after a prefill of `context` tokens, exactly the bytes the allocation expected
    cache = BudgetCache(model.config, chosen, path, 32, sink=4, window=0, attend="fused", method="auto")
    with torch.no_grad():
        for s in range(0, 160, 16):
            model(ids[:, s:s + 16], past_key_values=cache, use_cache=True)
    assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(chosen.ratio, rel=1e-9)
    del saved


def _own_calibration(calibrated, tmp_path, monkeypatch) -> str:
    """A copy of the budget calibration in tmp_path (a head share file beside it stays this test's)."""
    path = str(tmp_path / "auto.safetensors")
    shutil.copy(calibrated[1], path)
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    return path


def test_heads_true_builds_saves_and_resumes(calibrated, tiny_model, monkeypatch, tmp_path):
    path = _own_calibration(calibrated, tmp_path, monkeypatch)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    with pytest.raises(KvshrinkError, match="heads=N needs a head share calibration") as err:
        from_method("auto:budget=4:block=32:context=160:heads=2", model)
    assert "\n" not in str(err.value)
    _skewed(spec_from_config(model.config), header={**model_header(model), "block": 32}).save(H.path_beside(path))
    name = "auto:budget=4:block=32:context=160:heads=2"
    cache = from_method(name, model)
    assert any(isinstance(layer, HeadGroups) for layer in cache.layers) and "|" in cache.describe()
    assert f"allocated per KV head by the shares in {H.path_beside(path)}" in cache.describe()
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    file = str(tmp_path / "c.safetensors")
    cache.save(file, model)
    back = load_cache(file, model)
    nxt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = (model(nxt, past_key_values=c, use_cache=True).logits for c in (cache, back))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert back.nbytes() == cache.nbytes()


def test_mix_auto_with_heads_apart_holds_the_bytes_expected_and_its_kernel_equals_its_decoded_path(
        calibrated, tiny_model, monkeypatch, tmp_path):
    path = _own_calibration(calibrated, tmp_path, monkeypatch)
    model = prepare(copy.deepcopy(tiny_model), "mix-auto:block=32")
    _skewed(spec_from_config(model.config), header={**model_header(model), "block": 32}).save(H.path_beside(path))
    cache = from_method("mix-auto:budget=3:block=32:context=320:share=0.1:gather=4:heads=2", model)
    assert any(isinstance(layer, HeadGroups) for layer in cache.layers), cache.describe()
    ids = torch.randint(3, 128, (1, 320), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in range(0, 320, 40):
            model(ids[:, s:s + 40], past_key_values=cache, use_cache=True)
    assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(cache.allocation.ratio, rel=1e-9)
    assert all(0 < s <= 0.11 for s in cache.class_shares())  # each part keeps its own heads' high class
    grouped = next(i for i, layer in enumerate(cache.layers) if isinstance(layer, HeadGroups))
    spec = spec_from_config(model.config)
    kv = torch.zeros(1, spec.num_kv_heads, 1, spec.head_dim)
    states, _ = copy.deepcopy(cache).update(kv, kv, grouped)
    assert states.batch_key(1, None) is None  # a server serves its parts (scored states) one sequence at a time
    ref = cache.decoding_copy()
    gen = [torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    with torch.no_grad():
        a, b = ([model(g, past_key_values=c, use_cache=True).logits for g in gen] for c in (cache, ref))
    torch.testing.assert_close(torch.cat(a, 1), torch.cat(b, 1), rtol=1e-4, atol=1e-4)
    file = str(tmp_path / "mix.safetensors")
    cache.save(file, model)
    back = load_cache(file, model)
    with torch.no_grad():  # each part's high class, window and scores come back with it
        a, b = ([model(g, past_key_values=c, use_cache=True).logits for g in gen] for c in (cache, back))
    assert torch.equal(torch.cat(a, 1), torch.cat(b, 1))


@pytest.mark.parametrize("name,match", [("auto-6x:heads=8:entropy=true", "cannot be split by heads"),
                                        ("auto:heads=2:vector=true", "cannot be split by heads"),
                                        ("mix-auto-6x:heads=8:shares=allocated", "heads=N with shares=allocated"),
                                        ("auto:heads=-1", "heads must be an integer >= 0")])
def test_heads_refuse_what_cannot_be_split_in_one_line(name, match):
    with pytest.raises(KvshrinkError, match=match) as err:
        get_method(name)
    assert "\n" not in str(err.value)


def test_the_share_calibration_measures_each_head_alone(tiny_model):
    ids = torch.randint(3, 128, (2, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    spec = spec_from_config(tiny_model.config)
    kc, vc = A.key_codec(H.KEY_REF, 32, spec.rope), A.value_codec(H.VALUE_REF)
    calib = H.calibrate(tiny_model, ids, kc, vc, {"test": True}, sink=4, block=32)
    assert calib.kl_k.shape == calib.kl_v.shape == (spec.num_layers, spec.num_kv_heads)
    for which in ("key", "value"):
        s = calib.shares(which)
        assert (s >= 0).all() and np.allclose(s.sum(1), 1.0)
    # one head's figure is that head's round trip on the rows laid end to end, not the layer's
    perturbed = Perturbed(tiny_model, ids.reshape(1, -1), recent=16)
    one = perturbed.kl(1, "key", body_round_trip(kc, 4, 32, slice(1, 2)))
    both = perturbed.kl(1, "key", body_round_trip(kc, 4, 32))
    assert calib.kl_k[1, 1].item() == pytest.approx(one, rel=1e-9) and one < both


def test_a_server_batch_of_head_groups_is_one_call_per_group_and_each_sequence_gets_what_it_gets_alone(monkeypatch):
    """A server's decode tokens over layers in head groups (serve/ragged.py): the groups' states of sequences of
    different lengths share one batch key, one `attend_many` call per group serves them all, bit for bit what each
    sequence's own call gives; joint keys cut to a head group are one object however often they are cut, as the
    kernel batches joint keys by their codec."""
    g = torch.Generator().manual_seed(5)
    turn = tuple(10000.0 ** (-i / 8) for i in range(8))
    basis = torch.linalg.qr(torch.randn(3, 16, 16, generator=g))[0]
    joint = JointKeys(basis, [3] * 8 + [2] * 8, 16, turn, 3)
    assert joint.heads(1, 3) is joint.heads(1, 3) and joint.heads(0, 1) is not joint.heads(1, 3)
    groups = [(0, 1, IntQuant(2, "channel", 16, rotate=True, seed=1), IntQuant(3, "token", rotate=True, seed=2)),
              (1, 3, joint.heads(1, 3), IntQuant(2, "token", rotate=True, seed=2, levels="gauss"))]
    states, queries = [], []
    for n in (40, 77, 130):
        cache = CompressedCache(num_layers=1, layer_codecs=[groups], sink=4, block=16, attend="fused")
        layer = cache.layers[0]
        layer.update(torch.randn(1, 3, n, 16, generator=g), torch.randn(1, 3, n, 16, generator=g))
        s, _ = layer.update(torch.randn(1, 3, 1, 16, generator=g), torch.randn(1, 3, 1, 16, generator=g))
        states.append(s)
        queries.append(torch.randn(1, 6, 1, 16, generator=g))
    assert states[0].batch_key(1, None) == states[2].batch_key(1, None) is not None
    assert states[0].batch_key(2, None) is None  # a prompt chunk: each sequence alone
    calls, each = [], SplitStates.attend_many
    monkeypatch.setattr(SplitStates, "attend_many", staticmethod(lambda st, *a: calls.append(len(st)) or each(st, *a)))
    many = type(states[0]).attend_many(states, torch.cat(queries), 0.25)
    assert many.shape == (3, 1, 6, 16) and calls == [3, 3]  # one call per group, every sequence in it
    for s, q, got in zip(states, queries, many):
        assert torch.equal(got[None], s.attend(None, q, None, 0.25)[0])
