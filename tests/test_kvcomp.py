"""KVComp: error-bounded quantization, Huffman codes, the coded body, fused attention, save/load."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import from_method, load_cache, prepare
from kvshrink.codecs import huffman
from kvshrink.codecs.base import tensor_nbytes
from kvshrink.codecs.errbound import ErrorBound
from kvshrink.errors import KvshrinkError
from kvshrink.families.kvcomp.cache import KVCompCache
from kvshrink.families.kvcomp.codec import EntropyCodec


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def model(tiny_model):
    m = copy.deepcopy(tiny_model)  # switched to the kvshrink attention in place
    prepare(m, "kvcomp-eb0.1")
    return m


def _check_bound(x, bound, axis):
    eq = ErrorBound(bound, axis)
    q, mn, step = eq.quantize(x)
    err = (ErrorBound.dequantize(q, mn, step) - x).abs()
    half = step.float() / 2
    # a value exactly between two levels is half a step off, and float32 rounds min + code * step twice,
    # each time to half an ulp of a partial sum no larger than |x| + |min| (found by hypothesis: x = 16.07,
    # min -30.25, step 0.4751, a tie at 97.5, one ulp over)
    ulps = (x.abs() + mn.float().abs()) * 2.0 ** -23
    assert (err <= half * (1 + 1e-6) + ulps + 1e-7).all()
    dim = 3 if axis == "channel" else 4
    rng = x.amax(dim, keepdim=True) - mn.float()
    assert (step.float() <= bound * rng * (1 + 2 ** -10) + 1e-7).all()
    assert int(q.max()) <= eq.qmax


@settings(max_examples=40, deadline=None)
@given(bound=st.sampled_from([1 / 255, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]), axis=st.sampled_from(["channel", "token"]),
       scale=st.floats(1e-3, 1e3), outlier=st.floats(0, 1e4), const=st.booleans(), seed=st.integers(0, 2**16))
def test_every_element_within_half_a_step(bound, axis, scale, outlier, const, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 16, 8, generator=g) * scale
    x[0, 1, 0, 3, 2] += outlier  # one outlier widens its group's range
    if const:
        x[1, 0, 1] = 0.1234567  # a constant block whose value is not a float16
    _check_bound(x, bound, axis)


def test_bound_holds_on_real_activations(bundled):
    model, tok = bundled
    from transformers import DynamicCache

    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.", return_tensors="pt").input_ids
    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :16], past_key_values=cache)
    for layer in cache.layers[::6]:
        for x, axis in ((layer.keys, "channel"), (layer.values, "token")):
            _check_bound(x.reshape(1, x.shape[1], 1, 16, x.shape[-1]), 0.1, axis)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused(bad):
    x = torch.randn(1, 1, 1, 4, 8)
    x[0, 0, 0, 1, 1] = bad
    with pytest.raises(KvshrinkError, match="NaN or infinite"):
        ErrorBound(0.1, "channel").quantize(x)


@pytest.mark.parametrize("bound", [0, -0.1, 0.001, 2.0, "x"])
def test_impossible_bounds_are_refused(bound):
    with pytest.raises(KvshrinkError, match="impossible error bound"):
        ErrorBound(bound, "token")


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 10_000), min_size=2, max_size=64), seed=st.integers(0, 2**16))
def test_huffman_codes_are_prefix_free_near_entropy_and_round_trip(counts, seed):
    counts = np.array(counts) + 1
    table = huffman.Table.from_counts(counts)
    assert table.lengths.max() <= huffman.MAX_LEN
    assert np.sum(2.0 ** -table.lengths.astype(float)) <= 1 + 1e-12  # Kraft: a prefix code
    ent = huffman.entropy_bits(counts)
    if table.lengths.max() < huffman.MAX_LEN:  # no length limiting: Huffman is within 1 bit/symbol
        assert ent <= table.bits(counts) < ent + counts.sum()
    rng = np.random.default_rng(seed)
    sym = rng.choice(counts.size, size=(5, 97), p=counts / counts.sum()).astype(np.uint8)
    fixed = huffman.Table(huffman.fixed_lengths(counts.size))
    tables = [table, fixed]
    which = np.array([0, 1, 0, 1, 1])
    stream, starts = huffman.encode(sym, which, np.stack([t.codes for t in tables]), np.stack([t.lengths for t in tables]))
    # exact bit packing: each block is its codes' bits, rounded up to a byte, plus the look-ahead pad
    bits = [tables[w].bits(np.bincount(s, minlength=counts.size)) for s, w in zip(sym, which)]
    assert stream.size == sum((b + 7) // 8 for b in bits) + huffman.PAD
    assert fixed.bits(np.bincount(sym[1], minlength=counts.size)) == 97 * int(np.ceil(np.log2(counts.size)))
    out = huffman.decode(stream, starts, which, np.stack([t.lut_sym for t in tables]),
                         np.stack([t.lut_len for t in tables]), np.stack([t.lut_n for t in tables]),
                         np.array([t.fixed for t in tables], dtype=np.uint8), 97)
    assert np.array_equal(out, sym)
    # blocks decode alone, from their own offset
    one = huffman.decode(stream, starts[3:4], which[3:4], np.stack([t.lut_sym for t in tables]),
                         np.stack([t.lut_len for t in tables]), np.stack([t.lut_n for t in tables]),
                         np.array([t.fixed for t in tables], dtype=np.uint8), 97)
    assert np.array_equal(one[0], sym[3])


@pytest.mark.parametrize("bound", [1 / 255, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_every_symbol_is_reachable(bound, axis):
    # a symbol no element can take would still take code space (and a bit in the packed form)
    x = torch.randn(1, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    eq = ErrorBound(bound, axis)
    q, _, _ = eq.quantize(x)
    top = q.amax(eq.dim)  # each group's largest symbol: its maximum element's
    assert bool((top == eq.qmax).all())


@settings(max_examples=40, deadline=None)
@given(n_symbols=st.integers(2, 16), skew=st.floats(0.2, 3.0), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_tuple_codes_round_trip_and_meet_the_huffman_bound(n_symbols, skew, n, seed):
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(n_symbols))
    sym = rng.choice(n_symbols, size=(4, n), p=p / p.sum()).astype(np.uint8)
    k = huffman.tuple_size(n_symbols)
    assert k == max(j for j in (1, 2, 3) if n_symbols ** j <= huffman.TUPLES)
    coded = huffman.tuples(sym, n_symbols, k)
    assert coded.shape == (4, -(-n // k))
    counts = np.bincount(coded.reshape(-1), minlength=n_symbols ** k) + 1  # every tuple seen: Huffman's bound holds
    table = huffman.Table.from_counts(counts, n_symbols)
    assert table.k == k and table.fixed == 0
    assert table.lut_n.max() <= huffman.MULTI and (table.lut_n % k == 0).all()  # whole tuples per lookup
    if table.lengths.max() < huffman.MAX_LEN:  # Huffman's bound over the tuples
        ent = huffman.entropy_bits(counts)
        assert ent <= table.bits(counts) < ent + counts.sum()
    stream, starts = huffman.encode(coded, np.zeros(4, dtype=np.int64), table.codes[None], table.lengths[None])
    assert stream.size == sum((table.bits(np.bincount(c, minlength=counts.size)) + 7) // 8 for c in coded) + huffman.PAD
    out = huffman.decode(stream, starts, np.zeros(4, dtype=np.int64), table.lut_sym[None], table.lut_len[None],
                         table.lut_n[None], np.zeros(1, dtype=np.uint8), n)
    assert np.array_equal(out, sym)  # the last tuple's padding is not part of a block


@pytest.mark.parametrize("bound", [0.05, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_codes_are_within_two_percent_of_the_entropy_at_every_bound(bound, axis):
    # Gaussian states with a few outlier channels, as keys and values look: the skewed histograms where
    # single-symbol codes lose most (the likeliest of 5 symbols above 40%)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 512, 64, generator=g) * torch.linspace(0.5, 2, 64)
    x[..., :2] *= 8
    codec = EntropyCodec(ErrorBound(bound, axis), 64)
    codec.encode(x, 64)
    s = codec.stats()
    assert s["bits_per_symbol"] <= 1.02 * s["entropy_bits_per_symbol"]
    single = EntropyCodec(ErrorBound(bound, axis), 64, tuples=False)  # the same symbols one by one
    single.encode(x, 64)
    assert s["bits_per_symbol"] <= single.stats()["bits_per_symbol"]


@pytest.mark.parametrize("entropy", [True, False])
def test_body_round_trip_bytes_and_table_refresh(entropy):
    g = torch.Generator().manual_seed(1)
    codec = EntropyCodec(ErrorBound(0.1, "channel"), 8, entropy=entropy, drift=0.05)
    a = torch.randn(2, 3, 16, 8, generator=g)
    b = torch.randn(2, 3, 8, 8, generator=g) * 3
    c = (torch.rand(2, 3, 8, 8, generator=g) ** 4) * 5  # skewed symbols: a different histogram
    body = None
    for x in (a, b, c):  # as the token store grows its body: one encode per call, pieces joined
        piece = codec.encode(x, 8)
        body = piece if body is None else body.cat(piece)
    view = body.view()
    x = torch.cat([a, b, c], 2)
    q, mn, step = ErrorBound(0.1, "channel").quantize(x.reshape(2, 3, 4, 8, 8))
    assert torch.equal(view.symbols(), q)
    torch.testing.assert_close(view.decoded(), ErrorBound.dequantize(q, mn, step).reshape(x.shape))
    held = tensor_nbytes([*body.tensors.values(), *codec.shared_tensors()])
    assert held == (view.stream.nbytes + view.starts.nbytes + view.table_of.nbytes + view.mn.nbytes
                    + view.step.nbytes + view.lut_sym.nbytes + view.lut_len.nbytes + view.lut_n.nbytes
                    + codec.lengths.nbytes + view.fixed.nbytes + codec.codes.nbytes)
    # a cut and a batch selection recode the symbols with the tables they had: nothing changes
    assert torch.equal(body.first_blocks(2).view().symbols(), q[:, :, :2])
    assert torch.equal(body.select_batch(torch.tensor([1])).view().symbols(), q[1:])
    st_ = codec.stats()
    assert st_["symbols"] == x.numel()
    if entropy:
        assert codec.n_tables == 2  # the skewed batch costs >5% more with the first table
        assert st_["entropy_bits_per_symbol"] <= st_["bits_per_symbol"] + 1e-9
        assert st_["bits_per_symbol"] < 4  # below the fixed width of 11 symbols
    else:
        assert codec.n_tables == 1 and st_["bits_per_symbol"] == 4


def _layer_states(cache_kw, n=300, t=1, batch=2, seed=0, group=3):
    g = torch.Generator().manual_seed(seed)
    cache = KVCompCache(num_layers=1, **cache_kw)
    layer = cache.layers[0]
    layer.update(torch.randn(batch, 2, n, 16, generator=g) * torch.linspace(0.2, 3, 16),
                 torch.randn(batch, 2, n, 16, generator=g))
    states, _ = layer.update(torch.randn(batch, 2, t, 16, generator=g), torch.randn(batch, 2, t, 16, generator=g))
    return states, torch.randn(batch, 2 * group, t, 16, generator=g)


@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("cap", [None, 1.5])
@pytest.mark.parametrize("group", [3, 2])
def test_fused_attention_equals_decode_then_attend(entropy, t, cap, group):
    """group: query heads per KV head (the kernel reads rows three at a time where it can, the rest one by one)."""
    states, q = _layer_states(dict(key_bound=0.1, value_bound=0.2, key_block=16, value_block=32, entropy=entropy), t=t,
                              group=group)
    assert states.body is not None and states.body.keys.num_blocks == 2 * states.body.values.num_blocks
    n = states.before[0].shape[2] + states.body.num_tokens + sum(x.shape[2] for x in states.after[0]) - t
    mask = torch.ones(2, 1, t, n + t, dtype=torch.bool).tril(n)
    mask[1, ..., :7] = False  # left padding of the second sequence: inside the sink and the first block
    fused = states.attend(None, q, mask, None, cap)[0]  # cap: Gemma 2's logit soft-cap
    states.fused = False
    ref = states.attend(None, q, mask, None, cap)[0]
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    if cap:
        assert not torch.allclose(ref, states.attend(None, q, mask)[0], atol=1e-3)


def test_generation_fused_equals_reference_and_bytes_are_real(model):
    ids = _ids(150, batch=2, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    outs = []
    for attend in ("fused", "decode"):
        cache = KVCompCache(model.config, key_bound=0.1, value_bound=0.1, key_block=16, value_block=32, attend=attend)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        outs.append(out)
        body_tokens = cache.layers[0].k.body.num_tokens
        assert body_tokens == (190 - 4) // 32 * 32  # whole value blocks past the sink
        held = sum(sum(t.untyped_storage().nbytes() for t in layer.tensors()) for layer in cache.layers)
        assert cache.nbytes() == held
        kb = cache.layers[0].k.body.tensors
        coded = sum(kb[f].untyped_storage().nbytes() for f in ("stream", "starts", "mn", "step"))
        assert coded < 2 * 2 * body_tokens * 16 * 2 / 2.5  # fp16 keys of 2 sequences x 2 heads, over 2.5
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_tighter_bounds_give_closer_logits(model):
    from transformers import DynamicCache

    ids = _ids(120, seed=4)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits[0, 100:]
        errs = []
        for eb in (0.3, 0.02):
            cache = KVCompCache(model.config, key_bound=eb, value_bound=eb, key_block=16, value_block=32)
            model(ids[:, :100], past_key_values=cache)
            got = torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits[0] for i in range(100, 120)])
            errs.append((got - ref).abs().mean())
    assert errs[1] < errs[0] / 3


def _decoded(layer):
    return layer.k.decoded(torch.float32), layer.v.decoded(torch.float32)


def test_crop_and_batch_selection_keep_the_coded_tokens(model):
    ids = _ids(100, batch=2, seed=6)
    cache = KVCompCache(model.config, key_block=16, value_block=32)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[1]
    k_all, v_all = _decoded(layer)
    cache.crop(-30)  # 70 tokens: 4 sink + 2 whole blocks of 32 + 2 recent
    k, v = _decoded(layer)
    assert cache.get_seq_length() == 70 and layer.k.body.num_tokens == 64
    torch.testing.assert_close(k, k_all[:, :, :70], rtol=0, atol=1e-3)  # float16 of the cut block's decode
    torch.testing.assert_close(v, v_all[:, :, :70], rtol=0, atol=1e-3)
    cache.batch_select_indices(torch.tensor([1]))
    k1, _ = _decoded(layer)
    assert torch.equal(k1, k[1:])


def test_save_load_resumes_the_same_generation(model, tmp_path, tiny_config):
    ids = _ids(130, seed=8)
    cache = from_method("kvcomp-eb0.1:key_block=16:value_block=32", model)
    with torch.no_grad():
        model(ids[:, :120], past_key_values=cache)
        size = cache.save(tmp_path / "chat.kvc")
        assert size < cache.nbytes()  # the file keeps code lengths, not the decoding lookups
        loaded = load_cache(str(tmp_path / "chat.kvc"), model)
        assert loaded.get_seq_length() == 120 and loaded.nbytes() == cache.nbytes()
        a = [model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(120, 130)]
        b = [model(ids[:, i:i + 1], past_key_values=loaded).logits for i in range(120, 130)]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.add_(0.01)
    with pytest.raises(KvshrinkError, match="other weights"):
        load_cache(str(tmp_path / "chat.kvc"), other)
    (tmp_path / "junk.kvc").write_bytes(b"not a cache")
    with pytest.raises(KvshrinkError, match="not a safetensors file"):
        load_cache(str(tmp_path / "junk.kvc"), model)


@pytest.mark.parametrize("name, message", [
    ("kvcomp-eb0.1:keb=3", "impossible error bound"),
    ("kvcomp-eb0.1:value_block=48", "not a multiple of key_block"),
    ("kvcomp-eb0.1:attend=gpu", "unknown attend"),
    ("kvcomp-eb0.1:eb=x", "needs a number"),
])
def test_bad_options_are_refused(model, name, message):
    with pytest.raises(KvshrinkError, match=message):
        from_method(name, model)


def test_cli_refuses_an_impossible_bound(capsys):
    from kvshrink.cli import main

    assert main(["bench", "--methods", "kvcomp-eb0.1:eb=0", "--sections", "quality", "--segments", "1",
                 "--seg-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "impossible error bound" in err and len(err.strip().splitlines()) == 1


def test_cli_saves_a_chat_and_resumes_it(tmp_path, capsys, bundled):
    from kvshrink.cli import main

    model, tok = bundled
    path = str(tmp_path / "chat.kvc")
    prompt = "Count: one, two,"
    assert main(["generate", "--method", "kvcomp-eb0.1:key_block=16:value_block=32", "--prompt", prompt, "--raw",
                 "--max-new-tokens", "40", "--save-cache", path]) == 0
    n = len(tok(prompt).input_ids) + 40 - 1  # the last new token is never fed back
    assert f"saved {n} tokens" in capsys.readouterr().out
    m = prepare(copy.deepcopy(model), "kvcomp-eb0.1")
    loaded = load_cache(path, m)
    assert loaded.get_seq_length() == n and loaded.ids.shape == (1, n) and loaded.layers[0].k.body.num_tokens > 0
    assert main(["generate", "--resume", path, "--prompt", " three,", "--max-new-tokens", "4"]) == 0
    extra = len(tok(" three,", add_special_tokens=False).input_ids)
    assert f"for {n + extra + 4 - 1} tokens" in capsys.readouterr().out  # the saved tokens, then the new ones


def test_a_cache_built_from_a_config_needs_the_model_to_be_saved(tiny_config, tmp_path):
    cache = from_method("int4", tiny_config)
    with pytest.raises(KvshrinkError, match="not built from a model: pass it"):
        cache.save(str(tmp_path / "x.kvc"))
