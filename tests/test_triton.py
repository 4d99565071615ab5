"""The Triton decode kernels (kernels/gpu.py and each family's gpu.py) against the reference paths.

Without a GPU they run in Triton's interpreter (tests/conftest.py turns it on before transformers
imports Triton); on a CUDA machine the same tests run the compiled kernels on CPU tensors' copies.
Every decode path of the model-level matrix is in tests/test_matrix.py; here: the shared coded-body
kernel over every bit width, key axis, rotation, soft-cap, padding and length, and paged rows with
left padding (the kernels' visibility by original position).
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink import KvshrinkError, from_method, prepare
from kvshrink.codecs.errbound import ErrorBound
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.rvq import RVQ
from kvshrink.core.layer import stage_for
from kvshrink.families.kvcomp import kernel as kvcomp_kernel
from kvshrink.families.kvcomp.codec import EntropyCodec
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.quant import kernel
from kvshrink.families.rvq import kernel as rvq_kernel
from kvshrink.kernels import backend
from kvshrink.kernels.partials import dense_partial, merge

if backend.CUDA:
    pytest.skip("a CUDA machine: test_matrix.py's cuda test checks the kernels on the device", allow_module_level=True)
if not backend.ON_CPU:
    pytest.skip(backend.WHY_NOT_ON_CPU, allow_module_level=True)
gpu = pytest.importorskip("kvshrink.families.quant.gpu")  # imports Triton
rvq_gpu = pytest.importorskip("kvshrink.families.rvq.gpu")
kvcomp_gpu = pytest.importorskip("kvshrink.families.kvcomp.gpu")
kernels_gpu = pytest.importorskip("kvshrink.kernels.gpu")


@pytest.fixture(autouse=True)
def exact_products(monkeypatch):
    """Float32 products: these tests check the kernels' logic against numba's to float32 rounding; the
    default float16 products are bounded by their own test below."""
    monkeypatch.setattr(kernels_gpu.TUNING, "precision", "ieee")


def test_merge_of_partials_is_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 50, 8,
                                                                                                       generator=g)
    vis = torch.rand(2, 2, 50, generator=g) > 0.3
    vis[1, :, :] = False  # a sequence that sees nothing gets zeros
    parts = [dense_partial(q, k[:, :, a:b], v[:, :, a:b], vis[..., a:b]) for a, b in ((0, 7), (7, 31), (31, 50))]
    out = merge(*(torch.stack(x, 2) for x in zip(*parts)))
    s = (q @ k.transpose(2, 3)).masked_fill(~vis[:, torch.arange(4) % 2][:, None], float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def _body(kc, vc, b, h, n, d, g):
    x = torch.randn(b, h, n, d, generator=g) * torch.linspace(0.2, 3, d)
    return kc.encode(x, 64), vc.encode(torch.randn(b, h, n, d, generator=g), 64)


@settings(max_examples=30, deadline=None)
@given(kbits=st.integers(1, 8), vbits=st.integers(1, 8), key_axis=st.sampled_from(["channel", "token"]),
       rotate=st.booleans(), blocks=st.integers(1, 4), b=st.integers(1, 2), rows=st.integers(1, 6),
       nd=st.integers(0, 9), pad=st.integers(0, 80), cap=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 99),
       gauss=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
       pairs=st.sampled_from([0, 16, 12]), scales=st.sampled_from(["fp16", "8bit", "rms8"]))
def test_int_body_kernel_equals_the_numba_kernel(kbits, vbits, key_axis, rotate, blocks, b, rows, nd, pad, cap, seed,
                                                 gauss, pairs, scales):
    """Any bit width (codes straddling bytes), both key axes, rotation, soft-cap, bodies cut off by
    padding, dense parts of any size (none included), Gaussian levels for keys or values (4 bits or
    fewer, with float16 or 8-bit scales), per-channel keys turned back within groups over all or some
    channel pairs (partial rotary): the Triton kernel's output equals numba's."""
    g = torch.Generator().manual_seed(seed)
    d, h, n = 32, 2, 64 * blocks
    kl, vl = ("gauss" if on and bits <= 4 else "uniform" for on, bits in zip(gauss, (kbits, vbits)))
    turn = tuple(10000.0 ** (-i / pairs) for i in range(pairs)) if key_axis == "channel" else ()
    kc = IntQuant(kbits, key_axis, 16 if key_axis == "channel" else 16 if kbits % 2 else None, rotate=rotate, seed=1,
                  levels=kl, derope=turn, scales=scales if kl == "gauss" else "fp16")
    vc = IntQuant(vbits, "token", 8 if vbits % 2 else None, rotate=rotate, seed=2, levels=vl,
                  scales=scales if vl == "gauss" else "fp16")  # 8-bit scales: Gaussian levels only
    keys, values = _body(kc, vc, b, h, n, d, g)
    q = torch.randn(b, h, rows, d, generator=g) * 0.3
    vis = torch.ones(b, n, dtype=torch.bool)
    vis[-1, :pad] = False
    dk, dv = torch.randn(b, h, nd, d, generator=g), torch.randn(b, h, nd, d, generator=g)
    dvis = torch.ones(b, 1, nd, dtype=torch.bool)
    want = kernel.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 64, 3, cap)
    got = gpu.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 3, cap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(low=st.sampled_from([2, 3, 4]), high=st.sampled_from([4, 6, 8]), nstage=st.integers(0, 40),
       nwin=st.integers(0, 40), b=st.integers(1, 2), rows=st.integers(1, 6), nd=st.integers(0, 9),
       pad=st.integers(0, 80), cap=st.sampled_from([0.0, 1.5]), seed=st.integers(0, 99))
def test_int_body_stage_and_window_equal_the_numba_kernel_with_each_rows_log_sum_exp(low, high, nstage, nwin, b, rows,
                                                                                      nd, pad, cap, seed):
    """A body followed by a stage (keys in the stage codec, values in the body's) and a coded window (the mixed
    family's high class: rotated per-token codes of its own width), each empty or not, read by the Triton
    kernel's launches: the output and each row's log-sum-exp (which the mixed family's scores take) equal numba's."""
    g = torch.Generator().manual_seed(seed)
    d, h, n = 32, 2, 128
    kc = IntQuant(low, "channel", 64, rotate=True, seed=1)
    vc = IntQuant(low, "token", 16 if low == 3 else None, rotate=True, seed=2)
    wc = IntQuant(high, "token", rotate=True, seed=5)
    sc = stage_for(kc)
    keys, values = _body(kc, vc, b, h, n, d, g)
    # an empty part is None, as a layer passes it
    stage = (sc.encode(torch.randn(b, h, nstage, d, generator=g), 1),
             vc.encode(torch.randn(b, h, nstage, d, generator=g), 1), sc) if nstage else None
    window = (wc.encode(torch.randn(b, h, nwin, d, generator=g) * 2, 1),
              wc.encode(torch.randn(b, h, nwin, d, generator=g), 1), wc) if nwin else None
    q = torch.randn(b, h, rows, d, generator=g) * 0.3
    vis = torch.ones(b, n + nstage + nwin, dtype=torch.bool)
    vis[-1, :pad] = False
    dk, dv = torch.randn(b, h, nd, d, generator=g), torch.randn(b, h, nd, d, generator=g)
    dvis = torch.ones(b, 1, nd, dtype=torch.bool)
    lse = np.empty((b, h, rows), dtype=np.float32)
    want = kernel.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 64, 3, cap, stage, window, lse)
    got, got_lse = gpu.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 3, cap, stage, window, scored=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got_lse, torch.from_numpy(lse), rtol=1e-5, atol=1e-5)
    alone = gpu.fused_attend(q, vis[:, :n], dk, dv, dvis, keys, values, kc, vc, 3, cap)
    if nstage + nwin and not cap:  # the runs take part: without them the output differs
        assert not torch.allclose(alone, got, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_float16_products_stay_within_float16_rounding_of_the_exact_kernel(bits, monkeypatch):
    """The default float16 tensor-core inputs (float32 sums) move the output by float16 rounding, no
    more: within 2e-3 of its scale of the float32 products (int4 keys and values, the whole-byte paths
    of 2, 4 and 8 bits), and not identical to them (the setting takes effect)."""
    g = torch.Generator().manual_seed(bits)
    d, h, n = 64, 2, 256
    kc, vc = IntQuant(bits, "channel", 64), IntQuant(bits, "token", None)
    keys, values = _body(kc, vc, 2, h, n, d, g)
    q = torch.randn(2, h, 4, d, generator=g) * d ** -0.5
    vis = torch.ones(2, n, dtype=torch.bool)
    dk, dv = torch.randn(2, h, 3, d, generator=g), torch.randn(2, h, 3, d, generator=g)
    dvis = torch.ones(2, 1, 3, dtype=torch.bool)
    exact = gpu.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 3)
    monkeypatch.setattr(kernels_gpu.TUNING, "precision", "fp16")
    half = gpu.fused_attend(q, vis, dk, dv, dvis, keys, values, kc, vc, 3)
    err = (half - exact).abs().max().item()
    assert 0 < err <= 2e-3 * exact.abs().max().item()


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), depth=st.integers(1, 3), group=st.sampled_from([4, 8]),
       grouping=st.sampled_from(["strided", "contiguous"]), stage=st.integers(0, 40), rows=st.integers(1, 4),
       cap=st.sampled_from([0.0, 2.0]), seed=st.integers(0, 99))
def test_rvq_kernel_equals_the_numba_kernel(bits, depth, group, grouping, stage, rows, cap, seed):
    """RVQ codes of 2 to 8 bits, 1 to 3 levels, both channel groupings, a body and a stage segment."""
    g = torch.Generator().manual_seed(seed)
    d, b, h = 32, 2, 2  # every token's codes whole bytes, as the kernels require (rvq kernel.supported)
    codecs = [RVQ(torch.randn(depth, 1 << bits, group, generator=g), grouping) for _ in range(2)]
    segments = []
    for n, block in ((128, 64), (stage, 1)):
        if n:
            segments.append(tuple(c.encode(torch.randn(b, h, n, d, generator=g), block) for c in codecs))
    assert rvq_kernel.supported(*codecs, d)
    n = sum(k.num_tokens for k, _ in segments)
    q = torch.randn(b, h, rows, d, generator=g) * 0.3
    vis = torch.ones(b, n, dtype=torch.bool)
    vis[1, :seed] = False
    dk, dv = torch.randn(b, h, 5, d, generator=g), torch.randn(b, h, 5, d, generator=g)
    dvis = torch.ones(b, 1, 5, dtype=torch.bool)
    want = rvq_kernel.fused_attend(q, vis, dk, dv, dvis, segments, *codecs, 64, 2, cap)
    got = rvq_gpu.attend(q, vis, dk, dv, dvis, segments, *codecs, 2, cap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@settings(max_examples=5, deadline=None)
@given(bound=st.sampled_from([0.05, 0.3, 1 / 15, 1 / 255]), entropy=st.booleans(), blocks=st.integers(1, 3),
       rows=st.integers(1, 3), cap=st.sampled_from([0.0, 2.0]), seed=st.integers(0, 99))
def test_kvcomp_kernel_equals_the_numba_kernel(bound, entropy, blocks, rows, cap, seed):
    """Huffman tables (serial decode, tables changing between batches of blocks) and fixed-width ones (4
    bits at 1/15, 8 bits at 1/255: read by position), keys per channel in blocks of 8, values per token in
    blocks of 16."""
    g = torch.Generator().manual_seed(seed)
    d, b, h = 8, 2, 2
    kc = EntropyCodec(ErrorBound(bound, "channel"), 8, entropy)
    vc = EntropyCodec(ErrorBound(bound, "token"), 16, entropy)
    keys = values = None
    for i in range(blocks):  # one batch of blocks at a time, as a store codes them (new tables may come)
        x = torch.randn(b, h, 16, d, generator=g) * (1 + 3 * i)
        k, v = kc.encode(x, 16), vc.encode(torch.randn(b, h, 16, d, generator=g) ** (i + 1), 16)
        keys, values = (k, v) if keys is None else (keys.cat(k), values.cat(v))
    n = 16 * blocks
    q = torch.randn(b, h, rows, d, generator=g)
    vis = torch.ones(b, n, dtype=torch.bool)
    vis[1, :seed % n] = False
    dk, dv = torch.randn(b, h, 3, d, generator=g), torch.randn(b, h, 3, d, generator=g)
    dvis = torch.ones(b, 1, 3, dtype=torch.bool)
    want = kvcomp_kernel.fused_attend(q, vis, dk, dv, dvis, keys.view(), values.view(), 2, cap)
    got = kvcomp_gpu.fused_attend(q, vis, dk, dv, dvis, keys.view(), values.view(), 2, cap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def _zdc_calibration(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path))
    m0 = copy.deepcopy(tiny_model)
    zdc.calibrate(m0, torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(1)),
                  {"test": True}).save(zdc.default_calibration_path(m0))


@pytest.mark.parametrize("name", ["kvc-4x", "kvc-4x+int4", "int3-rot", "zdc-adaptive-75+int3", "mix-int2",
                                  "zdc-mix-50"])
def test_left_padded_batch_decodes_alike_on_both_kernels(tiny_model, name, tmp_path, monkeypatch):
    """Left padding: rows kept by original position (paged) and bodies with invisible tokens."""
    if name.startswith("zdc"):
        _zdc_calibration(tiny_model, tmp_path, monkeypatch)
    m = prepare(copy.deepcopy(tiny_model), name)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 170), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    feed = torch.randint(3, 128, (2, 5), generator=gen)

    def run():
        cache, am, out = from_method(name, m), mask, []
        with torch.no_grad():
            out.append(m(ids, attention_mask=am, past_key_values=cache, use_cache=True).logits[:, -1])
            for i in range(feed.shape[1]):
                am = torch.cat([am, am.new_ones(2, 1)], 1)
                out.append(m(feed[:, i:i + 1], attention_mask=am, past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out, 1)

    cpu = run()
    calls = sum(backend.CALLS.values())
    with backend.use("triton"):
        gpu = run()
    assert sum(backend.CALLS.values()) - calls >= feed.shape[1] * 2
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mix-int2", "mix-int3:window_bits=6", "zdc-mix-50"])
def test_mixed_classes_decode_and_rank_alike_on_both_kernels(tiny_model, name, tmp_path, monkeypatch):
    """An importance-aware cache through leaving steps (two rounds of 16 decode steps): the Triton kernel reads the
    body, stage, high class (and a coded window) in place and hands back the log-sum-exp the window's scores come
    from, so the logits, and the tokens each head keeps at high precision, are numba's (bit for bit)."""
    if name.startswith("zdc"):
        _zdc_calibration(tiny_model, tmp_path, monkeypatch)
    m = prepare(copy.deepcopy(tiny_model), name)
    gen = torch.Generator().manual_seed(6)
    ids, feed = torch.randint(3, 128, (1, 230), generator=gen), torch.randint(3, 128, (1, 34), generator=gen)

    def run():
        cache, out = from_method(name, m), []
        with torch.no_grad():
            out.append(m(ids, past_key_values=cache, use_cache=True).logits[:, -1])
            for i in range(feed.shape[1]):
                out.append(m(feed[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out, 1), cache

    cpu, cpu_cache = run()
    calls = sum(backend.CALLS.values())
    with backend.use("triton"):
        gpu, gpu_cache = run()
    assert sum(backend.CALLS.values()) - calls >= feed.shape[1] * 2
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
    for a, b in zip(cpu_cache.layers, gpu_cache.layers):
        assert a.high_tokens() > 0 and a.high_tokens() == b.high_tokens()
        high = [getattr(x.hk, "tensors", {"codes": x.hk})["codes"] for x in (a, b)]  # int codes, or ZDC's float16
        assert torch.equal(*high)
        torch.testing.assert_close(a.wsum, b.wsum, rtol=1e-4, atol=1e-6)


def test_forcing_an_unknown_kernel_kind_is_refused():
    with pytest.raises(KvshrinkError, match="unknown kernel kind 'cuda'"):
        with backend.use("cuda"):
            pass
