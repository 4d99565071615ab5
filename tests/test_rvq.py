"""Residual vector quantization: codec, codebook learning, byte accounting, code-domain attention."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import CompressedCache, from_method
from kvshrink.attention.function import use_kvshrink_attention
from kvshrink.codecs.rvq import RVQ, channel_order, residual_codes
from kvshrink.core.calibfile import spread_offsets
from kvshrink.errors import KvshrinkError
from kvshrink.families.rvq import calibrate as rvq_calib
from kvshrink.families.rvq.cache import CodedCache


def _books(depth, size, group, seed=0):
    return torch.randn(depth, size, group, generator=torch.Generator().manual_seed(seed))


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_calib(tiny_model):
    """Codebooks learned on the tiny model's own activations (depth 3, 16 codewords of 8 channels)."""
    return rvq_calib.calibrate(tiny_model, _ids(96, batch=4, seed=5), group=8, size=16, depth=3, iters=4)


@pytest.fixture()
def model(tiny_model):
    m = copy.deepcopy(tiny_model)  # switched to the kvshrink attention in place
    use_kvshrink_attention(m)
    return m


def _cache(model, calib, depth, code_domain=True, window=0, fused=False):
    codecs = [(RVQ(k, "strided", depth), RVQ(v, "contiguous", depth)) for k, v in zip(calib.keys, calib.values)]
    return CodedCache(model.config, layer_codecs=codecs, sink=4, window=window, block=8, code_domain=code_domain,
                      fused=fused)


@pytest.mark.parametrize("grouping", ["strided", "contiguous"])
def test_a_vector_made_of_codewords_is_coded_exactly(grouping):
    d, group, size = 32, 8, 16
    books = _books(3, size, group)
    books[1:, 0] = 0.0  # deeper levels can add nothing: a zero codeword
    chosen = torch.tensor([3, 7, 0, 12])
    y = books[0, chosen].reshape(-1)
    books[0] /= y.pow(2).mean().sqrt()  # the chosen groups then have unit RMS, as the codec scales
    y = books[0, chosen].reshape(-1)
    x = torch.empty(d)
    x[channel_order(d, group, grouping)] = y
    x = (x * 2.0).view(1, 1, 1, d)  # scale a power of two: exact in float16
    codec = RVQ(books, grouping)
    packed = codec.encode(x, 1)
    codes = codec.codes(packed).view(4, 3) - torch.arange(3) * size
    assert codes[:, 0].tolist() == chosen.tolist() and (codes[:, 1:] == 0).all()
    torch.testing.assert_close(codec.decode(packed), x, rtol=2e-3, atol=0)  # float16 scale rounding only


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 4), bits=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([4, 8, 16]),
       tokens=st.integers(1, 9), seed=st.integers(0, 1000))
def test_codes_bytes_and_greedy_search(depth, bits, group, tokens, seed):
    d, size = 32, 1 << bits
    books = _books(4, size, group, seed)
    codec = RVQ(books, "strided", depth)
    x = torch.randn(2, 3, tokens, d, generator=torch.Generator().manual_seed(seed + 1)) * 5
    packed = codec.encode(x, 1)
    n = d // group
    # exact dense packing: groups x depth codes of `bits` bits per vector, one float16 scale
    assert packed.tensors["codes"].numel() == 2 * 3 * tokens * -(-n * depth * bits // 8)
    assert packed.nbytes() == 2 * 3 * tokens * (-(-n * depth * bits // 8) + 2)
    assert codec.shared_tensors()[0].nbytes == depth * size * group * 2
    # codes are the greedy residual choice, computed here without the codec
    scale = packed.tensors["scale"].float().reshape(2, 3, tokens, 1)
    y = (x / scale)[..., channel_order(d, group, "strided")].reshape(-1, group)
    want, _ = residual_codes(y, books[:depth].half().float())
    got = codec.codes(packed).view(-1, depth) - torch.arange(depth) * size
    assert torch.equal(got, want)
    # decode is the sum of the chosen codewords, times the scale
    dec = codec.decode(packed)
    ref = books[:depth].half().float()[torch.arange(depth), want].sum(1).view(2, 3, tokens, d)
    back = torch.empty_like(ref)
    back[..., channel_order(d, group, "strided")] = ref
    torch.testing.assert_close(dec, back * scale, rtol=1e-5, atol=1e-5)


def test_refuses_bad_codebooks_and_states():
    with pytest.raises(KvshrinkError, match="power of two"):
        RVQ(_books(2, 12, 8))
    with pytest.raises(KvshrinkError, match="depth 3"):
        RVQ(_books(2, 16, 8), depth=3)
    with pytest.raises(KvshrinkError, match="does not divide"):
        RVQ(_books(2, 16, 7)).encode(torch.randn(1, 1, 1, 32), 1)
    with pytest.raises(KvshrinkError, match="NaN"):
        RVQ(_books(2, 16, 8)).encode(torch.full((1, 1, 1, 32), float("nan")), 1)
    with pytest.raises(KvshrinkError, match="grouping"):
        RVQ(_books(2, 16, 8), "random")


def test_residual_shrinks_with_depth_on_real_activations(bundled):
    model, tok = bundled
    from kvshrink.corpus import default_corpus

    text = open(default_corpus()).read()
    ids = tok(text[:40000], return_tensors="pt").input_ids[0]
    keys, values = rvq_calib.collect(model, ids[:512].view(2, 256))
    held_k, held_v = rvq_calib.collect(model, ids[2000:2256].view(1, 256))
    for layer in (1, 20):
        for train, held, grouping in ((keys, held_k, "strided"), (values, held_v, "contiguous")):
            books, left = rvq_calib.train(train[layer], 16, grouping, size=64, depth=4, iters=4)
            assert all(b < a for a, b in zip(left, left[1:]))  # on the training vectors
            x = held[layer].view(1, 1, -1, 64)
            errs = [(RVQ(books, grouping, dep).decode(RVQ(books, grouping, dep).encode(x, 1)) - x).pow(2).sum()
                    / x.pow(2).sum() for dep in range(1, 5)]
            assert all(b < a for a, b in zip(errs, errs[1:])), errs  # and on held-out ones
            assert errs[-1] < 0.5 * errs[0]


def test_code_domain_scores_and_sums_equal_decode_then_attend():
    g = torch.Generator().manual_seed(3)
    codec = RVQ(_books(4, 32, 8, seed=4), "strided", 3)
    k = torch.randn(2, 3, 37, 32, generator=g)
    packed = codec.encode(k, 1)
    q = torch.randn(2, 3, 5, 32, generator=g)
    dec = codec.decode(packed)
    torch.testing.assert_close(codec.key_scores(q, packed), q @ dec.transpose(2, 3), rtol=1e-4, atol=1e-4)
    p = torch.softmax(torch.randn(2, 3, 5, 37, generator=g), -1)
    torch.testing.assert_close(codec.value_sums(p, packed), p @ dec, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 4), size=st.sampled_from([16, 256]), key_grouping=st.sampled_from(["strided", "contiguous"]),
       value_grouping=st.sampled_from(["strided", "contiguous"]), window=st.sampled_from([0, 3]),
       n=st.integers(30, 120), t=st.sampled_from([1, 3]), pad=st.integers(0, 40), seed=st.integers(0, 99),
       cap=st.sampled_from([None, 1.5]))
def test_kernel_equals_decode_then_attend(depth, size, key_grouping, value_grouping, window, n, t, pad, seed, cap):
    g = torch.Generator().manual_seed(seed)
    kc = RVQ(_books(depth, size, 8, seed=seed), key_grouping)
    vc = RVQ(_books(depth, size, 8, seed=seed + 1), value_grouping)
    layer = CodedCache(num_layers=1, key_codec=kc, value_codec=vc, sink=4, window=window, block=8, fused=True).layers[0]
    layer.update(torch.randn(2, 2, n, 32, generator=g), torch.randn(2, 2, n, 32, generator=g))
    states, _ = layer.update(torch.randn(2, 2, t, 32, generator=g), torch.randn(2, 2, t, 32, generator=g))
    assert states.body is not None and states.body.name == "rvq"  # the compiled kernel reads this layer
    q = torch.randn(2, 6, t, 32, generator=g)
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, t, total, dtype=torch.bool).tril(total - t)
    mask[1, ..., :pad] = False  # left padding of the second sequence: in the sink, the body, or beyond
    fused = states.attend(None, q, mask, None, cap)[0]  # cap: Gemma 2's logit soft-cap
    states.fused = False
    torch.testing.assert_close(fused, states.attend(None, q, mask, None, cap)[0], rtol=1e-4, atol=1e-5)


def test_kernel_never_decodes_the_history(monkeypatch):
    g = torch.Generator().manual_seed(0)
    codec = RVQ(_books(2, 16, 8), "strided")
    layer = CodedCache(num_layers=1, key_codec=codec, sink=4, window=0, block=8, fused=True).layers[0]
    layer.update(torch.randn(1, 2, 60, 32, generator=g), torch.randn(1, 2, 60, 32, generator=g))
    states, _ = layer.update(torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g))
    decode = RVQ.decode
    monkeypatch.setattr(RVQ, "decode", lambda self, packed, *a, **k: pytest.fail("the body was decoded")
                        if packed.num_tokens > 8 else decode(self, packed, *a, **k))
    assert states.attend(None, torch.randn(1, 6, 1, 32, generator=g), None)[0].shape == (1, 1, 6, 32)


@pytest.mark.parametrize("window", [0, 6])
def test_code_domain_generation_equals_decode_then_attend(model, tiny_calib, window):
    ids = _ids(40, batch=2, seed=7)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # left padding in the first row
    outs = []
    for code_domain, fused in ((True, True), (True, False), (False, False)):
        cache = _cache(model, tiny_calib, 3, code_domain, window, fused)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        outs.append(out)
    for other in outs[1:]:  # the compiled kernel, PyTorch from the codes, decode-then-attend
        assert torch.equal(outs[0].sequences, other.sequences)
        for a, b in zip(outs[0].scores, other.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compressed_logits_close_to_uncompressed_and_better_with_depth(model, tiny_calib):
    from transformers import DynamicCache

    ids = _ids(64, seed=9)
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits[0, 40:]
        errs = []
        for depth in (1, 3):
            cache = _cache(model, tiny_calib, depth)
            model(ids[:, :40], past_key_values=cache)
            got = torch.cat([model(ids[:, i:i + 1], past_key_values=cache).logits[0] for i in range(40, 64)])
            errs.append((got - ref).abs().mean())
    assert errs[1] < errs[0]


def test_cache_bytes_are_codes_scales_sink_and_codebooks(model, tiny_calib):
    cache = _cache(model, tiny_calib, 2)
    with torch.no_grad():
        model(_ids(50), past_key_values=cache)
    # per layer, keys and values: 4 float16 sink tokens, 46 coded tokens of 16/8 groups x 2 levels
    # 4-bit codes (2 bytes) + one float16 scale, the first 2 levels of the 16x8 codebooks in float16;
    # 2 KV heads of 16 dims; and the channel order the codec holds beside them (16 int64)
    per_store = 2 * 4 * 16 * 2 + 2 * 46 * (2 + 2) + 2 * 16 * 8 * 2 + 16 * 8
    assert cache.nbytes() == 2 * 2 * per_store
    assert cache.fp16_nbytes() == 2 * 2 * 2 * 50 * 16 * 2


def test_per_layer_codecs_must_match_the_model(tiny_model, tiny_calib):
    codecs = [(RVQ(tiny_calib.keys[0]), RVQ(tiny_calib.values[0]))]
    with pytest.raises(KvshrinkError, match="per-layer codecs"):
        CompressedCache(tiny_model.config, layer_codecs=codecs)


def test_calibration_keys_come_from_positions_spread_over_the_context(tiny_model, tiny_calib):
    """Post-RoPE keys turn with their position (codebooks from positions 0..95 alone would not see later
    angles): the sequences sit at spread offsets, and a shift turns the keys but leaves the values."""
    assert tiny_calib.header["positions"] == spread_offsets(4, 96, tiny_model.config.max_position_embeddings)
    assert tiny_calib.header["positions"][-1] == 512 - 96
    ids = _ids(40, seed=7)
    k0, v0 = rvq_calib.collect(tiny_model, ids)
    k1, v1 = rvq_calib.collect(tiny_model, ids, offsets=[300])
    for a, b in zip(v0, v1):  # attention sees relative positions only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(k0, k1))


def test_calibration_file_round_trip_and_refusals(tiny_model, tiny_calib, tmp_path):
    path = str(tmp_path / "c.safetensors")
    tiny_calib.save(path)
    back = rvq_calib.RvqCalibration.load(path, tiny_model)
    assert torch.equal(back.keys, tiny_calib.keys) and back.header["group"] == 8
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.add_(1.0)
    with pytest.raises(KvshrinkError, match="other weights"):
        rvq_calib.RvqCalibration.load(path, other)
    bad = rvq_calib.RvqCalibration(tiny_calib.keys, tiny_calib.values,
                                   {**tiny_calib.header, "shape": [9, 9, 9, 9]})
    bad.save(path)
    with pytest.raises(KvshrinkError, match="not for this model"):
        rvq_calib.RvqCalibration.load(path, tiny_model)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(KvshrinkError, match="not a safetensors"):
        rvq_calib.RvqCalibration.load(str(tmp_path / "x.safetensors"))
    assert json.loads(json.dumps(tiny_calib.header))["depth"] == 3


def test_methods_find_their_codebooks_or_say_how_to_make_them(model, tiny_calib, tmp_path, monkeypatch):
    from kvshrink.families.rvq import cache as rvq_methods

    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path))
    monkeypatch.setattr(rvq_methods, "_CALIBS", type(rvq_methods._CALIBS)())
    with pytest.raises(KvshrinkError, match="kvshrink calibrate --method rvq --group 8"):
        from_method("rvq-d2:group=8", model)
    tiny_calib.save(rvq_calib.default_path(model, 8, 16, "strided", "contiguous"))
    cache = from_method("rvq-d2:group=8:size=16", model)
    assert isinstance(cache, CodedCache) and cache.code_domain and cache.attend == "fused"
    assert "numba kernel on the CPU, Triton on CUDA" in cache.describe()
    assert from_method("rvq-d2:group=8:size=16:attend=codes", model).attend == "codes"
    assert all(layer.k.codec.depth == 2 and layer.k.codec.bits == 4 for layer in cache.layers)
    assert not from_method("rvq-d2:group=8:size=16:attend=decode", model).code_domain
    with pytest.raises(KvshrinkError, match="unknown attend"):
        from_method("rvq-d2:group=8:size=16:attend=fast", model)


@pytest.mark.parametrize("args,message", [
    (["--group", "16", "--depth", "9"], "depth 9"),
    (["--size", "300"], "codebook size 300"),
    (["--key-grouping", "random"], "grouping 'random'"),
])
def test_cli_calibrate_refuses_bad_layouts(args, message, capsys):
    from kvshrink.cli import main

    assert main(["calibrate", "--method", "rvq", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
