"""Entropy-coded joint-basis keys (codecs/jointcoded.py): the same keys as fixed-width joint keys, the bytes their
streams really take (checked against the code lengths), cuts and batch changes that move whole streams, the int
kernel decoding the streams where it reads them, and the budget's code tables (families/budget/coded.py)."""

import copy
import dataclasses
import pickle
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_joint import TURN, D, _states, _widths  # the fixed-width joint keys' cases, coded here

from kvshrink import KvshrinkError, from_method, prepare
from kvshrink.attention.split import SplitStates
from kvshrink.codecs import huffman
from kvshrink.codecs.joint import JointKeys
from kvshrink.codecs.jointcoded import CODED, EMIT, TAIL, WINDOW, CodedJointKeys, WidthTables, tuple_size
from kvshrink.codecs.packing import packed_length
from kvshrink.codecs.quant import IntQuant
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget import coded as C
from kvshrink.families.budget import joint as J
from kvshrink.families.budget.cache import BudgetCache
from kvshrink.spec import spec_from_config

WIDTHS = (1, 2, 3, 4, 5, 6, 8)


def _tables(seed: int = 0) -> WidthTables:
    """Skewed codes: the inner levels likely, as min/max codes over a block make them."""
    rng = np.random.default_rng(seed)
    counts = {}
    for w in WIDTHS:
        levels = np.arange(1 << w)
        p = np.exp(-((levels - (levels.size - 1) / 2) / (0.3 * levels.size)) ** 2)
        sym = rng.choice(levels, size=(64, 3 * 128), p=p / p.sum())
        counts[w] = WidthTables.count(w, sym)
    return WidthTables.fit(counts)


TABLES = _tables()
NARROW = WidthTables({w: TABLES.lengths_of(w) for w in CODED})  # what a calibration fits: the rest packed


def _pair(bits, seed, heads=2, group=16, turn=TURN, tables=TABLES):
    g = torch.Generator().manual_seed(seed)
    inverse = torch.eye(D) + 0.2 * torch.randn(heads, D, D, generator=g)
    w = _widths(bits, seed)
    return JointKeys(inverse, w, group, turn, bits), CodedJointKeys(inverse, w, group, turn, bits, tables)


def _keys(seed, batch=2, tokens=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, tokens, D, generator=g) * torch.linspace(0.1, 4, D)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 6), seed=st.integers(0, 999), blocks=st.integers(1, 4), narrow=st.booleans())
def test_same_keys_as_fixed_width_and_the_bytes_the_codes_take(bits, seed, blocks, narrow):
    tables = NARROW if narrow else TABLES
    fixed, coded = _pair(bits, seed, tables=tables)
    x = _keys(seed, tokens=16 * blocks)
    p = coded.encode(x, 16)
    assert torch.equal(coded.decode(p), fixed.decode(fixed.encode(x, 16)))  # lossless: the same decoded keys
    axes = fixed.quantize(x, 16)[0]
    streams = 2 * 2 * blocks * len(fixed.classes)
    payload = 0
    for a, n, w in fixed.classes:  # every stream in whole bytes, its length from the code lengths of its tuples
        if tables.table(w) < 0:  # no table: packed at fixed width
            payload += 2 * 2 * blocks * packed_length(n * 16, w)
            continue
        sym = axes[..., a:a + n, :].reshape(-1, n * 16).numpy()
        tup = huffman.tuples(sym, 1 << w, tuple_size(w)).astype(np.int64)
        bits_each = tables.lengths_of(w).astype(np.int64)[tup].sum(1)
        payload += int(((bits_each + 7) // 8).sum())
    t = p.tensors
    assert t["stream"].numel() == payload + TAIL
    assert t["starts"].dtype == torch.int32 and t["starts"].shape == (2, 2, blocks, len(fixed.classes))
    # bytes: streams, a 4-byte offset each, a float16 min per axis and step per coded axis and block; nothing else
    assert p.nbytes() == payload + TAIL + 4 * streams + 2 * 2 * blocks * 2 * (D + fixed.coded)
    assert set(map(id, tables.tensors())) <= set(map(id, coded.shared_tensors()))  # the tables counted


def test_skewed_symbols_take_fewer_bytes_and_huffman_stays_within_a_bit_a_tuple_of_the_entropy():
    rng = np.random.default_rng(1)
    for w in (2, 3, 4):
        levels = np.arange(1 << w)
        p = np.exp(-((levels - (levels.size - 1) / 2) / (0.3 * levels.size)) ** 2)
        sym = rng.choice(levels, size=(200, 384), p=p / p.sum()).astype(np.uint8)
        counts = WidthTables.count(w, sym)
        table = WidthTables.fit({w: counts})
        spent = int(counts @ table.lengths_of(w).astype(np.int64))
        assert spent < 0.95 * w * sym.size  # fewer bits than fixed width
        assert huffman.entropy_bits(counts) <= spent <= huffman.entropy_bits(counts) + counts.sum()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 999), cut=st.integers(0, 6), order=st.permutations([0, 1, 2]))
def test_cuts_and_batch_changes_move_whole_streams(seed, cut, order):
    _, coded = _pair(3, seed)
    xs = [_keys(seed + i, batch=3, tokens=32) for i in range(3)]
    p = coded.encode(xs[0], 16).cat(coded.encode(xs[1], 16)).cat(coded.encode(xs[2], 16))
    ref = torch.cat([coded.decode(coded.encode(x, 16)) for x in xs], 2)
    assert torch.equal(coded.decode(p), ref)
    assert torch.equal(coded.decode(p.first_blocks(cut)), ref[:, :, :16 * cut]) if cut else True
    assert torch.equal(coded.decode(p.drop_first(16 * cut)), ref[:, :, 16 * cut:])
    idx = torch.tensor(order)
    assert torch.equal(coded.decode(p.select_batch(idx)), ref[idx])
    assert torch.equal(coded.decode(p.repeat_batch(2)), ref.repeat_interleave(2, 0))
    assert torch.equal(coded.decode(pickle.loads(pickle.dumps(p))), ref)  # parking writes it as it is
    kept = p.blocks(1, 4)
    assert kept.nbytes() < p.nbytes() and torch.equal(coded.decode(kept), ref[:, :, 16:64])


def test_a_table_a_coded_width_32_kb_a_lookup_and_an_out_of_range_width_refused():
    assert NARROW.widths == list(CODED) and TABLES.table(5) >= 0 > NARROW.table(5)
    assert NARROW.lut_sym.shape == (len(CODED), 1 << WINDOW, EMIT)
    assert NARROW.nbytes() == len(CODED) * ((1 << WINDOW) * (EMIT + 2) + 256 * 5)
    with pytest.raises(KvshrinkError, match="no code table for 5-bit symbols"):
        NARROW.lengths_of(5)
    with pytest.raises(KvshrinkError, match="widths 1..8"):
        WidthTables({9: np.ones(512)})


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 5), seed=st.integers(0, 999), n=st.integers(40, 150), t=st.sampled_from([1, 3]),
       narrow=st.booleans())
def test_kernel_decodes_the_streams_as_decode_then_attend_and_as_fixed_width(bits, seed, n, t, narrow):
    fixed, coded = _pair(bits, seed, tables=NARROW if narrow else TABLES)
    vc = IntQuant(2, "token", rotate=True, seed=2)
    layer, states, q = _states(coded, vc, n, t, seed)
    assert isinstance(states.body.key_codec, CodedJointKeys) and states.body.body_tokens >= 16
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, t, total, dtype=torch.bool).tril(total - t)
    fused = states.attend(None, q, mask, None)[0]
    want = dataclasses.replace(states, fused=False).attend(None, q, mask, None)[0]
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    _, plain, _ = _states(fixed, vc, n, t, seed)  # the same symbols unpacked: the same floats, the same sums
    assert torch.equal(plain.attend(None, q, mask, None)[0], fused)


def test_many_sequences_with_coded_keys_get_what_each_gets_alone():
    _, kc = _pair(3, 7, tables=NARROW)
    vc = IntQuant(2, "token", rotate=True, seed=2)
    made = [_states(kc, vc, n, 1, n, batch=1) for n in (50, 83, 130)]
    alone = [s.attend(None, q, None)[0] for _, s, q in made]
    many = SplitStates.attend_many([s for _, s, _ in made], torch.cat([q for _, _, q in made]))
    for i in range(len(made)):
        assert torch.equal(many[i:i + 1], alone[i])


@pytest.fixture(scope="module")
def budget(calibrated, tiny_model, tmp_path_factory):
    """Budget (conftest's), joint and code-table calibrations of the tiny model on random tokens, in a folder of
    their own (the joint file beside the budget's is this module's)."""
    ids = torch.randint(3, 128, (2, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    calib = calibrated[0]
    path = str(tmp_path_factory.mktemp("auto") / "auto.safetensors")
    shutil.copyfile(calibrated[1], path)
    found = J.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32, context=160)
    found.save(J.path_beside(path))
    tables = C.calibrate(tiny_model, ids, found, {"test": True}, sink=4, block=32, menu=A.KEY_MENU)
    return calib, path, found, tables, ids


def test_code_tables_cover_every_joint_width_and_their_bytes_are_the_coded_bodies(budget, tiny_model):
    _, _, found, tables, _ = budget
    spec = spec_from_config(tiny_model.config)
    used = {w for i in range(spec.num_layers) for j in range(len(J.CHOICES)) for w in found.widths[i, j].tolist() if w}
    assert set(tables.header["widths"]) == used & set(CODED) and tables.header["joint"] == C.joint_digest(found)
    assert tables.bytes.shape == found.bytes.shape
    h, d, block = spec.num_kv_heads, spec.head_dim, 32
    tokens = tables.header["tokens"]
    for i in range(spec.num_layers):
        for j in range(len(J.CHOICES)):
            classes = len(found.codec(i, j, block, spec.rope).classes)
            offsets = 4 * h * classes / block  # an int32 offset a stream
            params = 2 * 2 * d * h / block  # float16 min and step per axis
            # codes fitted to these symbols never take more than fixed width (2% for the +1 smoothing) plus a
            # byte a stream for whole bytes; nor less than the offsets and parameters
            most = (found.bytes[i, j] - params) * 1.02 + params + offsets + h * classes / block + TAIL / tokens
            assert offsets + params < tables.bytes[i, j] <= most


def test_a_coded_cache_counts_its_tables_once_and_meets_the_ratio_its_kernel_reads_the_streams(budget, tiny_model,
                                                                                                monkeypatch):
    calib, _, found, tables, _ = budget
    calib = copy.copy(calib)
    calib.proxy_k = torch.where(torch.isfinite(calib.proxy_k), 1.0, calib.proxy_k)  # joint keys made the choice
    spec = spec_from_config(tiny_model.config)
    # the tables' lookups (about 7 KB a width) weigh on a 2-layer model: a long context and a mild ratio
    chosen = A.choose(calib, spec, 1.2, 448, 4, 32, found, coded=tables)
    assert all(k[0] == A.JOINT for k in chosen.keys), chosen.describe()

    def check(cache):
        per_layer = sum(layer.nbytes() for layer in cache.layers)
        assert cache.nbytes() == per_layer - (len(cache.layers) - 1) * tables.tables.nbytes()
        # the coded bytes are the tokens' own, not the calibration's: near the ratio, not exactly it
        assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(chosen.ratio, rel=0.1)
        assert "Huffman-coded (tables.safetensors)" in cache.describe()
        coded_symbols = sum(n * 32 * p.num_blocks * 2 for layer in cache.layers for p in layer.k.body_parts()
                            for (_, n, w) in layer.k.codec.classes if w in tables.header["widths"])
        stats = cache.coding_stats()["keys"]  # the bench's coding table: bits against the entropy
        assert stats["symbols"] == coded_symbols > 0
        assert 0 < stats["entropy_bits_per_symbol"] <= 3 and 0 < stats["bits_per_symbol"] <= 3.1

    _fused_as_decode(budget, tiny_model, monkeypatch, chosen, 448, check)


def _fused_as_decode(budget, tiny_model, monkeypatch, chosen, prefill: int, check):
    """Caches of `chosen` prefilled with `prefill` tokens in chunks of 64, `check`ed where fused, then 10 decode steps:
    the fused kernel's logits equal decode-then-attend's."""
    _, path, found, tables, _ = budget
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    ids = torch.randint(3, 128, (1, prefill + 10), generator=torch.Generator().manual_seed(prefill))
    outs = []
    for attend in ("fused", "decode"):
        cache = BudgetCache(model.config, chosen, path, 32, None, (found, "joint.safetensors"),
                            (tables, "tables.safetensors"), sink=4, window=0, attend=attend)
        with torch.no_grad():
            for s in range(0, prefill, 64):
                model(ids[:, s:min(s + 64, prefill)], past_key_values=cache, use_cache=True)
            if attend == "fused":
                check(cache)
            steps = [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                     for i in range(prefill, prefill + 10)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("choice", [c for c in A.KEY_MENU if C.menu_coded(c)])
def test_a_coded_menu_key_is_the_menus_own_codes_in_streams(budget, choice):
    _, _, _, tables, _ = budget
    coded = tables.menu_codec(choice, 64, TURN)
    menu = A.key_codec(choice, 64, TURN)
    x = _keys(3, tokens=128)
    mine, theirs = coded.decode(coded.encode(x, 64)), menu.decode(menu.encode(x, 64))
    # the same codes: the int8 map rounds the basis by under 0.01%, which moves a float16 min or step by an ulp
    # and lands a rare code one level over
    err, ref = (mine - x).pow(2).mean(), (theirs - x).pow(2).mean()
    assert abs(float(err / ref) - 1) < 2e-3
    assert (mine - theirs).abs().le(1e-2 * (1 + theirs.abs())).float().mean() > 0.99
    assert tables.menu_codec(choice, 64, TURN) is coded
    other = next(c for c in A.KEY_MENU if C.menu_coded(c) and c[1] == choice[1] and c != choice)
    assert tables.menu_codec(other, 64, TURN).inverse_rows is coded.inverse_rows  # one map per rotation
    assert not any(C.menu_coded(c) for c in [(2, True, None, A.U, False), (4, True, None, A.U, True),
                                             (2, True, 64, A.U, True)])


def test_a_cache_of_coded_menu_keys_counts_each_map_once_and_its_kernel_reads_the_streams(budget, tiny_model,
                                                                                          monkeypatch):
    tables = budget[3]
    spec = spec_from_config(tiny_model.config)
    menu = [c for c in A.KEY_MENU if C.menu_coded(c)]
    chosen = A.Allocation([menu[1], menu[3]], [(2, True, None, A.G)] * 2, 0.0, 1.0)  # 2tr and 3tr: one map

    def check(cache):
        assert all(isinstance(layer.k.codec, CodedJointKeys) for layer in cache.layers)
        shared = tables.tables.nbytes() + spec.num_kv_heads * D * (D + 2)
        assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) - shared
        # the streams' bytes are what the calibration measured for such keys, within the tokens' spread
        body = sum(p.nbytes() for layer in cache.layers for p in layer.k.body_parts())
        expect = sum(tables.menu_bytes(i)[c] for i, c in enumerate(chosen.keys)) * 288
        assert body == pytest.approx(expect, rel=0.15)

    _fused_as_decode(budget, tiny_model, monkeypatch, chosen, 320, check)


def test_entropy_needs_joint_keys_and_its_tables_and_refuses_tables_of_another_joint_calibration(budget, tiny_model,
                                                                                                 monkeypatch):
    _, path, found, tables, ids = budget
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", path)
    model = prepare(copy.deepcopy(tiny_model), "auto:block=32")
    with pytest.raises(KvshrinkError, match="entropy=true codes the joint-basis keys: it needs joint=true"):
        from_method("auto:budget=3:block=32:context=160:entropy=true", model)
    side = C.path_beside(J.path_beside(path))
    with pytest.raises(KvshrinkError, match="entropy=true needs key code tables") as err:
        from_method("auto:budget=1.2:block=32:context=448:joint=true:entropy=true", model)
    assert "\n" not in str(err.value)
    other = copy.copy(found)
    other.inverse = found.inverse * 2
    C.calibrate(tiny_model, ids, other, {"test": True}, sink=4, block=32).save(side)
    with pytest.raises(KvshrinkError, match="fitted for another joint key calibration"):
        from_method("auto:budget=1.2:block=32:context=448:joint=true:entropy=true", model)
    tables.save(side)
    cache = from_method("auto:budget=1.2:block=32:context=448:joint=true:entropy=true", model)
    assert side in cache.describe()
