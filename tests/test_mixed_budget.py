"""One budget's codecs under a high class (families/mixed/budgeted.py: `mix-auto-6x`, `mix-auto:budget=N`).

Properties:
- the allocator pays for the high class, its scores and the float16 window from the same bytes: after a prefill of
  `context` tokens the cache holds exactly the bytes the allocation expected, each class the tokens expected;
- paying for it leaves the body fewer bytes, so its proxy is never lower than without a high class;
- the kernel's decode steps equal the decoded path on the same codes, per-layer codecs and high class alike;
- a saved cache resumes with its classes; impossible options refuse in one line;
- allocated shares (autoshares.py) are measured over the allocation's own body, keyed by it, and spread the high
  class with no more high-class bytes and no more summed loss than the uniform share.
"""

import copy

import pytest
import torch

from kvshrink import KvshrinkError, from_method, get_method, load_cache, prepare
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget.cache import layer_codecs
from kvshrink.families.mixed import allocate as shares_allocate
from kvshrink.families.mixed import autoshares, budgeted
from kvshrink.families.mixed.budgeted import MixedBudgetCache
from kvshrink.spec import spec_from_config

CONTEXT = 320


@pytest.fixture
def model(calibrated, tiny_model, monkeypatch):
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", calibrated[1])
    return prepare(copy.deepcopy(tiny_model), "mix-auto:block=32")


def _name(ratio, share, extra=""):
    return f"mix-auto:budget={ratio}:block=32:context={CONTEXT}:share={share}{extra}"


@torch.no_grad()
def _run(m, cache, ids, steps=0, chunk=40):
    """A chunked prefill (calls longer than the kernel's, as the bench's perplexity chunks), then decode steps."""
    for s in range(0, ids.shape[1], chunk):
        m(ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    gen = torch.Generator().manual_seed(7)
    return torch.cat([m(torch.randint(3, 128, (1, 1), generator=gen), past_key_values=cache,
                        use_cache=True).logits[:, -1] for _ in range(steps)]) if steps else None


def _ids(n, seed=1):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio,share,window_bits", [(3.0, 0.05, 16), (3.0, 0.2, 16), (4.0, 0.0, 16), (3.0, 0.05, 8),
                                                     (3.0, 0.2, 8), (4.0, 0.0, 8)])
def test_the_cache_holds_the_bytes_the_allocation_expects(model, ratio, share, window_bits):
    cache = from_method(_name(ratio, share, f":window_bits={window_bits}"), model)
    assert isinstance(cache, MixedBudgetCache) and cache.allocation.ratio >= ratio
    _run(model, cache, _ids(CONTEXT))
    assert cache.fp16_nbytes() / cache.nbytes() == pytest.approx(cache.allocation.ratio, rel=1e-9)
    spec = spec_from_config(model.config)
    for i, layer in enumerate(cache.layers):
        _, w, coded, staged = A.held_tokens(spec, i, CONTEXT, 4, 32, 16, share)
        high = A.high_count(share, CONTEXT - 4 - 16)
        assert (layer.window_count(), layer.high_tokens(), layer.k.body_tokens()) == (w, high, coded)
        assert layer.k.tokens_in(layer.k.stage) == staged
        if window_bits == 8:  # a coded window: its keys' and values' codes, each a token's codec bytes
            per = A.codec_bytes(layer.high, spec.num_kv_heads, spec.head_dim)
            assert layer.wk.nbytes() == layer.wv.nbytes() == w * per
    assert f"{100 * share:.3g}% of each head's tokens at int8" in cache.describe()
    coded = "int8 per-token whole-head +hadamard window"
    assert (coded if window_bits == 8 else "float16 window") in cache.describe()
    assert coded in from_method(_name(ratio, share), model).describe()  # the default: the high class's codes


def test_paying_for_a_high_class_never_lowers_the_bodys_proxy(calibrated, tiny_model):
    calib, _ = calibrated
    spec = spec_from_config(tiny_model.config)
    codec = A.window_codec(8)
    proxies = [A.choose(calib, spec, 3.0, CONTEXT, 4, 32, window=16, high=A.HighClass(s, codec)).proxy
               for s in (0.0, 0.05, 0.2)]
    assert proxies[0] <= proxies[1] <= proxies[2] and proxies[0] < proxies[2]
    _, fixed0 = A.layer_bytes(calib, spec, CONTEXT, 4, 32, window=16, high=A.HighClass(0.0, codec))
    _, fixed1 = A.layer_bytes(calib, spec, CONTEXT, 4, 32, window=16, high=A.HighClass(0.2, codec))
    high = A.high_count(0.2, CONTEXT - 20)  # 60 tokens a head: out of the blocks, into the high class
    # keys and values in 8-bit codes with a float16 step and minimum, a float32 score, with crop=true an int32 place
    per_high = spec.num_kv_heads * (2 * (spec.head_dim + 4) + 4)
    assert fixed1 - fixed0 == pytest.approx(spec.num_layers * high * per_high)
    _, fixed2 = A.layer_bytes(calib, spec, CONTEXT, 4, 32, window=16, high=A.HighClass(0.2, codec, places=True))
    assert fixed2 - fixed1 == pytest.approx(spec.num_layers * high * spec.num_kv_heads * 4)


@pytest.mark.parametrize("window_bits", [16, 8])
def test_kernel_decode_steps_equal_the_decoded_path(model, window_bits):
    fused = from_method(_name(3.0, 0.1, f":gather=4:window_bits={window_bits}"), model)
    _run(model, fused, _ids(CONTEXT))
    assert all(layer.kernel_reads and layer.hk is not None for layer in fused.layers)
    ref = fused.decoding_copy()
    a, b = _run(model, fused, _ids(0), steps=12), _run(model, ref, _ids(0), steps=12)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for x, y in zip(fused.layers, ref.layers):
        assert torch.equal(x.hk.tensors["codes"], y.hk.tensors["codes"])
        torch.testing.assert_close(x.hscore, y.hscore, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(x.importance(), y.importance(), rtol=1e-4, atol=1e-6)  # the window scored alike


@pytest.mark.parametrize("window_bits", [16, 8])
def test_a_saved_cache_resumes_with_its_classes(model, tmp_path, window_bits):
    cache = from_method(_name(3.0, 0.1, f":gather=4:memory=8:window_bits={window_bits}"), model)
    _run(model, cache, _ids(CONTEXT), steps=9)
    path = str(tmp_path / "mix-auto.safetensors")
    cache.save(path, model)
    loaded = load_cache(path, model)
    assert torch.equal(_run(model, cache, _ids(0), steps=10), _run(model, loaded, _ids(0), steps=10))
    for x, y in zip(cache.layers, loaded.layers):
        assert x.left == y.left and torch.equal(x.hk.tensors["codes"], y.hk.tensors["codes"])


def test_allocated_shares_are_measured_over_the_body_and_spend_no_more(model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path))
    monkeypatch.setattr(budgeted, "_CALIBS", type(budgeted._CALIBS)())
    name = _name(3.0, 0.02, ":shares=allocated")
    with pytest.raises(KvshrinkError, match="need a share calibration"):
        from_method(name, model)
    config, spec = get_method(name).config, spec_from_config(model.config)
    chosen, high = budgeted.chosen_for(config, model, name), budgeted.high_codec(config)
    key = autoshares.digest(chosen, 8, 32, 4)
    assert key != autoshares.digest(budgeted.chosen_for(get_method(_name(4.0, 0.02)).config, model, name), 8, 32, 4)
    assert key != autoshares.digest(chosen, 6, 32, 4)
    pairs = layer_codecs(chosen.allocation, 32, spec.rope, chosen.found, chosen.tables, chosen.vectors)
    calib = autoshares.calibrate(model, _ids(CONTEXT, seed=11), pairs, high, 4, 32, key, data={"test": True})
    proxy, grid = calib.proxy, autoshares.GRID
    assert proxy.shape == (spec.num_layers, len(grid)) and bool((proxy >= 0).all())
    assert float(proxy[:, -1].sum()) < float(proxy[:, 0].sum())  # 8% of the tokens at 8 bits lose less than none
    calib.save(autoshares.default_path(model, calib.header["data"], key))

    cache = from_method(name, model)
    extra = autoshares.extra(chosen.allocation, high, spec)
    shares = cache.layer_shares
    assert shares == shares_allocate.choose(calib, 0.02, extra) and set(shares) <= set(grid)
    assert sum(e * s for e, s in zip(extra, shares)) <= 0.02 * sum(extra) + 1e-9
    assert sum(float(proxy[i, grid.index(s)]) for i, s in enumerate(shares)) <= float(proxy[:, 2].sum()) + 1e-12
    uniform = from_method(_name(3.0, 0.02), model)
    _run(model, cache, _ids(CONTEXT))
    _run(model, uniform, _ids(CONTEXT))
    for layer, share in zip(cache.layers, shares):
        assert layer.high_tokens() == round(share * layer.left)
    # the extra bytes are a layer's mean over its blocks and stage; a per-layer quota rounds by half a token
    slack = spec.num_layers * (max(extra) + max(chosen.allocation.body)) / 2
    assert cache.nbytes() <= uniform.nbytes() + slack
    with pytest.raises(KvshrinkError, match=f"body={key}, not body=0"):
        calib.check(model, "mix-auto", body="0")


@pytest.mark.parametrize("option,message", [
    ("window_bits=6", "observation window is float16 \\(16\\) or in the high class's codes \\(high=8\\)"),
    ("high=6", "window_bits=8: .* set window_bits=6 or 16"),
    ("high=9", "impossible bit width high=9"),
    ("share=1.5", "share must be a number from 0 to 1"),
    ("window=0", "window must be an integer >= 1"),
])
def test_impossible_options_refuse_in_one_line(option, message):
    with pytest.raises(KvshrinkError, match=message) as err:
        get_method(f"mix-auto-6x:{option}")
    assert "\n" not in str(err.value)
