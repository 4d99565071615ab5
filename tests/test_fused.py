"""Fused decode attention over integer codes (families/quant/kernel.py), background coding, roofline."""

import copy
import dataclasses
from concurrent.futures import Future

import numba
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from kvshrink import CompressedCache, from_method
from kvshrink.attention import split
from kvshrink.attention.function import use_kvshrink_attention
from kvshrink.attention.split import SplitStates
from kvshrink.bench import REF, roofline_table
from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.vector import CODEWORDS, RUN, VectorQuant
from kvshrink.errors import KvshrinkError
from kvshrink.eval.speed import roofline, weight_bytes
from kvshrink.families.kvcomp.cache import KVCompCache
from kvshrink.kernels.tiles import split_item, workers


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def model(tiny_model):
    m = copy.deepcopy(tiny_model)  # switched to the kvshrink attention in place
    use_kvshrink_attention(m)
    return m


class Inline:
    """An executor that runs each job at once: the deferred path without a thread."""

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f


WINDOW_CODEC = IntQuant(8, "token", rotate=True, seed=4)  # the budget family's coded window (8-bit, rotated)


def _states(kc, vc, n, t, block, window, batch=2, seed=0, coded=False, group=3):
    """coded: the window held as WINDOW_CODEC's per-token codes, not float16; group: query heads per KV head (the
    kernel reads a KV head's rows three at a time where it can, the rest one by one)."""
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(num_layers=1, key_codec=kc, value_codec=vc, sink=4, window=window, block=block,
                            attend="fused", window_codec=WINDOW_CODEC if coded and window else None)
    layer = cache.layers[0]
    layer.update(torch.randn(batch, 2, n, 16, generator=g) * torch.linspace(0.2, 3, 16),
                 torch.randn(batch, 2, n, 16, generator=g))
    states, _ = layer.update(torch.randn(batch, 2, t, 16, generator=g), torch.randn(batch, 2, t, 16, generator=g))
    return layer, states, torch.randn(batch, 2 * group, t, 16, generator=g)


TURN = tuple(10000.0 ** (-i / 8) for i in range(8))  # RoPE frequencies of a 16-wide head
LEVELS = [("uniform", "uniform"), ("gauss", "uniform"), ("uniform", "gauss"), ("gauss", "gauss"), ("gauss8", "gauss8"),
          ("uniform", "gaussrms"), ("gaussrms", "gaussrms")]


def _lv(kind: str) -> dict:
    """IntQuant's level options for a LEVELS name: gauss8 is Gaussian levels with 8-bit scales, gaussrms with one
    8-bit root mean square a group (no mean: the kernel reads the RMS8 format)."""
    return {"gauss8": {"levels": "gauss", "scales": "8bit"},
            "gaussrms": {"levels": "gauss", "scales": "rms8"}}.get(kind, {"levels": kind})


def _values(bits, group, rotate, kind, vector):
    """The value codec: IntQuant, or (vector, at 1 and 2 bits) vector levels with a codebook of random codewords."""
    if vector and bits in RUN:
        return VectorQuant(bits, torch.randn(CODEWORDS, RUN[bits], generator=torch.Generator().manual_seed(bits)))
    return IntQuant(bits, "token", group, rotate=rotate, seed=2, **_lv(kind))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), rotate=st.booleans(), key_axis=st.sampled_from(["channel", "token"]),
       value_group=st.sampled_from([None, 8]), block=st.sampled_from([16, 32]), window=st.sampled_from([0, 3]),
       n=st.integers(40, 200), t=st.sampled_from([1, 3]), pad=st.integers(0, 40), seed=st.integers(0, 99),
       cap=st.sampled_from([None, 1.5]), levels=st.sampled_from([LEVELS[0]] * 2 + LEVELS), turned=st.booleans(),
       coded=st.booleans(), vector=st.booleans(), group=st.sampled_from([3, 3, 1, 2, 4]))
def test_kernel_equals_decode_then_attend(bits, rotate, key_axis, value_group, block, window, n, t, pad, seed, cap,
                                          levels, turned, coded, vector, group):
    """Levels: the integers, or Gaussian ones for keys, values or both (a code read as its level; at 1 bit
    folded into the step and minimum; float16 or 8-bit scales), or vector levels for values (a byte a run of
    coordinates, read as its codeword); per-channel keys turned back within their groups or not (the
    kernel's query per offset); a window in float16 or in per-token codes (read in place after the stage)."""
    kl, vl = levels if bits <= 4 else LEVELS[0]
    turn = TURN if turned and key_axis == "channel" else ()
    kc = IntQuant(bits, key_axis, block if key_axis == "channel" else None, rotate=rotate, seed=1, **_lv(kl),
                  derope=turn)
    vc = _values(bits, value_group, rotate, vl, vector)
    layer, states, q = _states(kc, vc, n, t, block, window, seed=seed, coded=coded, group=group)
    assert hasattr(states, "attend")
    body = states.body
    assert body is None or body.body_tokens % block == 0  # keys and values keep whole blocks alike
    if body is not None and key_axis == "channel":  # a block still filling: its codes read in place, not decoded
        staged = (n - 4 - window) % block  # the prefill's tokens after sink, whole blocks and window
        assert (body.stage[0].num_tokens if body.stage is not None else 0) == staged
    if body is not None and layer.body_reads_stage:  # a coded window: read in place too
        assert (body.window is not None) == (coded and window > 0)
    total = layer.get_seq_length()
    mask = torch.ones(2, 1, t, total, dtype=torch.bool).tril(total - t)
    mask[1, ..., :pad] = False  # left padding of the second sequence: in the sink, the body, or beyond
    fused = states.attend(None, q, mask, None, cap)[0]  # cap: Gemma 2's logit soft-cap
    states.fused = False
    ref = states.attend(None, q, mask, None, cap)[0]
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    if cap:  # the cap changes the answer here, so a kernel that ignored it would fail above
        assert not torch.allclose(ref, states.attend(None, q, mask)[0], atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rotate=st.booleans(), key_axis=st.sampled_from(["channel", "token"]),
       value_group=st.sampled_from([None, 8]), window=st.sampled_from([0, 3]),
       lengths=st.lists(st.integers(24, 200), min_size=1, max_size=5), seed=st.integers(0, 99),
       cap=st.sampled_from([None, 1.5]), levels=st.sampled_from([LEVELS[0]] * 2 + LEVELS), turned=st.booleans(),
       cuts=st.lists(st.integers(1, 11), max_size=3), coded=st.booleans(), vector=st.booleans())
def test_many_sequences_in_one_call_get_what_each_gets_alone(bits, rotate, key_axis, value_group, window, lengths,
                                                              seed, cap, levels, turned, cuts, coded, vector):
    """A server's batch: one decode token for each of several sequences of different lengths (bodies of
    different block counts, dense parts of different sizes), read by one kernel call, bit for bit what
    each sequence's own call gives; also when bodies come in parts (blocks shared with other sequences,
    then their own: cut after `cuts` blocks), read where they are."""
    kl, vl = levels if bits <= 4 else LEVELS[0]
    turn = TURN if turned and key_axis == "channel" else ()
    kc = IntQuant(bits, key_axis, 16 if key_axis == "channel" else None, rotate=rotate, seed=1, **_lv(kl), derope=turn)
    vc = _values(bits, value_group, rotate, vl, vector)
    made = [_states(kc, vc, n, 1, 16, window, batch=1, seed=seed + i, coded=coded) for i, n in enumerate(lengths)]
    states = [s for _, s, _ in made]
    q = torch.cat([q for _, _, q in made])
    assert all(s.batch_key(1, None) == states[0].batch_key(1, None) is not None for s in states)
    many = SplitStates.attend_many(states, q, 0.25, cap)
    assert many.shape == (len(lengths), 1, 6, 16)
    in_parts = [dataclasses.replace(s, body=_in_parts(s.body, cuts)) if s.body is not None else s for s in states]
    many_parts = SplitStates.attend_many(in_parts, q, 0.25, cap)
    for i, s in enumerate(states):
        alone, _ = s.attend(None, q[i:i + 1], None, 0.25, cap)
        assert torch.equal(many[i:i + 1], alone)
        assert torch.equal(many_parts[i:i + 1], alone)
        assert torch.equal(in_parts[i].attend(None, q[i:i + 1], None, 0.25, cap)[0], alone)  # joined per call
    assert states[0].batch_key(2, None) is None  # more than one token per sequence: each alone


@settings(max_examples=60, deadline=None)
@given(nb=st.integers(1, 4), nh=st.integers(1, 5), splits=st.integers(1, 8), light=st.integers(1, 3),
       nw=st.integers(1, 16))
def test_work_items_cover_every_part_once_and_share_the_body_evenly(nb, nh, splits, light, nw):
    """The kernels' schedule (kernels/tiles.py): items 0..n-1 are every (sequence, head, part) once, and workers
    taking every nw-th item get body ranges that differ in count by at most one (numba's own contiguous runs gave
    one of 2 threads 8 of a 3-head call's 12)."""
    parts = splits + light
    items = nb * nh * parts
    got = [split_item(i, nb, nh, splits, parts) for i in range(items)]
    assert sorted(got) == [(b, h, p) for b in range(nb) for h in range(nh) for p in range(parts)]
    body = [sum(1 for i in range(w, items, nw) if got[i][2] < splits) for w in range(nw)]
    assert max(body) - min(body) <= 1
    assert 1 <= workers(items) <= items


def test_the_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Each part is computed alone and merged in a fixed order, so how the parts are shared out changes nothing."""
    kc, vc = IntQuant(3, "channel", 16, rotate=True, seed=1), IntQuant(3, "token", rotate=True, seed=2)
    _, states, q = _states(kc, vc, 300, 1, 16, 3, coded=True)
    threads = numba.get_num_threads()
    try:
        outs = []
        for n in sorted({1, threads}):
            numba.set_num_threads(n)
            outs.append(states.attend(None, q, None, 0.25)[0])
    finally:
        numba.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs)
    assert workers(3 * 7) == min(threads, 21)


def _in_parts(body, cuts):
    """An IntBody whose keys and values come as parts cut after the given counts of cache blocks."""
    n = body.num_tokens
    edges = sorted({c * body.block for c in cuts if c * body.block < n})
    spans = list(zip([0] + edges, edges + [n]))

    def cut(p):
        return [p.blocks(a // p.block, b // p.block) for a, b in spans]
    return dataclasses.replace(body, key_parts=cut(body.keys), value_parts=cut(body.values))


def test_kernel_never_decodes_the_history(monkeypatch):
    kc, vc = IntQuant(4, "channel", 32, seed=1), IntQuant(4, "token", seed=2)
    _, states, q = _states(kc, vc, 200, 1, 32, 0)

    def refuse(*a, **k):
        raise AssertionError("the fused path decoded the body")

    want = dataclasses.replace(states, fused=False).attend(None, q, None)[0]  # decode, then attend
    monkeypatch.setattr(IntQuant, "decode", lambda self, packed, *a, **k: refuse() if packed.num_tokens > 32 else
                        IntQuant.__dict__["decode"](self, packed, *a, **k))
    torch.testing.assert_close(states.attend(None, q, None)[0], want, rtol=1e-4, atol=1e-5)


def test_the_kernel_is_named_in_a_profile_and_only_there(monkeypatch):
    """scripts/profile_decode.py finds the kernel's span by name; with no profiler recording no span is opened
    (record_function cost about 20 us a layer)."""
    kc, vc = IntQuant(4, "channel", 32, seed=1), IntQuant(4, "token", seed=2)
    _, states, q = _states(kc, vc, 200, 1, 32, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        states.attend(None, q, None)
    assert "int.fused_attend" in {e.key for e in prof.key_averages()}

    def refuse(*a, **k):
        raise AssertionError("a span opened with no profiler recording")

    monkeypatch.setattr(split, "record_function", refuse)
    states.attend(None, q, None)


def test_the_stage_is_read_in_place_not_decoded(monkeypatch):
    """A key block still filling (6-bit rotated per-token keys for int4's per-channel ones), and a recent window
    in 8-bit codes, are read by the kernel from their codes: a decode step decodes nothing, alone or batched, and
    gives the reference's output."""
    kc, vc = IntQuant(4, "channel", 32, seed=1), IntQuant(4, "token", seed=2)
    real = IntQuant.__dict__["decode"]
    monkeypatch.setattr(IntQuant, "decode", lambda *a, **k: pytest.fail("a decode step decoded codes"))
    made = [_states(kc, vc, n, 1, 32, 0, batch=1, seed=n) for n in (90, 121)]  # stages of 22 and 21 tokens
    made += [_states(kc, vc, n, 1, 32, 5, batch=1, seed=n, coded=True) for n in (95, 126)]  # and 5 coded recent tokens
    for layer, states, _ in made:
        assert layer.k.tokens_in(layer.k.stage) > 0 and states.body.stage is not None
    for _, states, _ in made[2:]:
        assert states.body.window is not None and states.body.window[0].num_tokens == 5
    alone = [s.attend(None, q, None)[0] for _, s, q in made]
    many = SplitStates.attend_many([s for _, s, _ in made], torch.cat([q for _, _, q in made]))
    monkeypatch.setattr(IntQuant, "decode", real)
    for i, (_, states, q) in enumerate(made):
        want = dataclasses.replace(states, fused=False).attend(None, q, None)[0]
        torch.testing.assert_close(alone[i], want, rtol=1e-4, atol=1e-5)
        assert torch.equal(many[i:i + 1], alone[i])


def test_crop_keeps_whole_blocks_and_the_kernel_still_reads(model):
    cache = from_method("int4:block=32", model)
    with torch.no_grad():
        model(_ids(150), past_key_values=cache)
        cache.crop(-25)  # 125 tokens: 4 sink + 96 in whole blocks + 25 staged
        layer = cache.layers[0]
        assert layer.k.tokens_in(layer.k.body) == layer.v.tokens_in(layer.v.body) == 96
        assert layer._readable()
        assert cache.get_seq_length() == 125


@pytest.mark.parametrize("name,n,cut", [("int4", 150, -25), ("int4", 150, -3), ("int4", 150, -40),
                                        ("mix-int3:gather=4:memory=8:crop=true", 300, -150)])
def test_after_a_crop_into_a_block_the_kernel_reads_every_token(model, name, n, cut):
    """A crop into a coded block leaves the keys' kept tokens in float16 and the values' in their staged per-token
    codes; the kernel read the keys' stage beside the values' of other tokens, or dropped the values', until the
    stages hold the same tokens again (logits off by up to 0.5 on the tiny model before the fix)."""
    outs = []
    for attend in ("fused", "decode"):
        cache = from_method(f"{name}:block=32:attend={attend}", model)
        with torch.no_grad():
            model(_ids(n), past_key_values=cache)
            cache.crop(cut)
            nxt = _ids(12, seed=1)
            steps = [model(nxt[:, :3], past_key_values=cache).logits]
            steps += [model(nxt[:, i:i + 1], past_key_values=cache).logits for i in range(3, 12)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["int4", "int3-rot", "int3-rot:prerope=true", "int2:key_axis=token:value_group=8"])
def test_generation_fused_equals_decode_then_attend(model, name):
    ids = _ids(150, batch=2, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    outs = []
    for attend in ("fused", "decode"):
        cache = from_method(f"{name}:block=32:attend={attend}", model)
        assert (cache.attend == "fused") == (attend == "fused")
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40,
                                       do_sample=False, output_scores=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_perplexity_fused_equals_decode_then_attend(model):
    """Short chunks (the fused path serves calls of up to 8 tokens): the same negative log-likelihood."""
    ids = _ids(161, seed=5)
    nll = {}
    for attend in ("fused", "decode"):
        cache = from_method(f"int4:block=32:attend={attend}", model)
        total = 0.0
        with torch.no_grad():
            for s in range(0, 160, 8):
                logits = model(ids[:, s:s + 8], past_key_values=cache).logits
                total += torch.nn.functional.cross_entropy(logits[0], ids[0, s + 1:s + 9], reduction="sum").item()
        nll[attend] = total / 160
    assert abs(nll["fused"] - nll["decode"]) < 1e-4 * nll["decode"]


def test_codes_with_padding_inside_a_token_are_not_read_by_the_kernel():
    from kvshrink.families.quant.kernel import supported

    assert supported(IntQuant(3, "channel", 32), IntQuant(3, "token"), head_dim=64)
    assert not supported(IntQuant(3, "channel", 32), IntQuant(3, "token"), head_dim=12)  # 36 bits a token
    assert not supported(IntQuant(4, "channel", 32), IntQuant(3, "token", group=4), head_dim=64)
    assert not supported(IntQuant(4, "channel", 32), IntQuant(4, "channel", 32), head_dim=64)


def test_a_config_alone_gets_decode_then_attend_and_says_so(tiny_config):
    cache = from_method("int4", tiny_config)
    assert cache.attend == "decode" and "decode-then-attend" in cache.describe()
    with pytest.raises(KvshrinkError, match="no fused kernel"):
        CompressedCache(tiny_config, key_codec=IntQuant(4, "channel", 128), value_codec=IntQuant(4, "channel", 128),
                        attend="fused")


@pytest.mark.parametrize("family", ["int4", "kvcomp"])
def test_background_coding_does_not_depend_on_the_thread(model, family):
    """The worker thread and an inline executor give identical logits; coding on the step itself
    (background off) gives the same tokens and close logits (a block is read from its stage codes one
    step longer)."""
    ids = _ids(100, seed=7)
    runs = {}
    for mode in ("thread", "inline", "off"):
        if family == "int4":
            cache = from_method(f"int4:block=32:background={int(mode != 'off')}", model)
            if mode == "inline":
                for layer in cache.layers:
                    layer.k.executor = layer.v.executor = Inline()
        else:
            cache = KVCompCache(model.config, key_block=16, value_block=32, background=mode != "off")
            if mode == "inline":
                cache.pool = Inline()
        with torch.no_grad():
            out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=70, min_new_tokens=70, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        held = sum(sum(t.untyped_storage().nbytes() for t in layer.tensors()) for layer in cache.layers)
        assert cache.nbytes() == held
        assert cache.get_seq_length() == 169
        runs[mode] = out
    assert torch.equal(runs["thread"].sequences, runs["inline"].sequences)
    for a, b in zip(runs["thread"].scores, runs["inline"].scores):
        assert torch.equal(a, b)
    assert torch.equal(runs["thread"].sequences, runs["off"].sequences)
    for a, b in zip(runs["thread"].scores, runs["off"].scores):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_background_blocks_reach_the_body(model):
    cache = from_method("int4:block=32", model)
    with torch.no_grad():
        model.generate(input_ids=_ids(40), past_key_values=cache, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    layer = cache.layers[0]
    layer.k.settle()
    layer.v.settle()
    # 103 tokens held (the last generated token is never fed back): 4 sink, 96 coded, 3 staged
    assert layer.k.tokens_in(layer.k.body) == layer.v.tokens_in(layer.v.body) == 96
    assert layer.k.tokens_in(layer.k.stage) + layer.k.fresh.shape[-2] == 3  # decode steps wait in float16


def test_weight_bytes_count_a_tied_matrix_once():
    lin = torch.nn.Linear(8, 16, bias=False)
    emb = torch.nn.Embedding(16, 8)
    lin.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "head": lin})
    m.register_buffer("extra", torch.zeros(10))
    assert weight_bytes(m) == 16 * 8 * 4 + 10 * 4


def test_roofline_fraction():
    r = roofline({"cache_bytes_end": 1_000_000, "decode_tok_s": 10.0}, weights=9_000_000, bandwidth=200e6)
    assert r["bytes_per_step"] == 10_000_000
    assert r["attained_gb_s"] == pytest.approx(0.1)
    assert r["bandwidth_fraction"] == pytest.approx(0.5)
    assert r["bandwidth_bound_tok_s"] == pytest.approx(20.0)


def test_the_roofline_table_gives_the_median_step_against_dynamic_cache():
    """A baseline whose mean is pulled by one slow step: steps per second say 2.00x, the median step 1.25x."""
    def speed(p50, tok_s):
        return {"decode_tok_s": tok_s, "decode_p50_ms": p50, "decode_p99_ms": 2 * p50, "decode_max_ms": 3 * p50,
                "read_bandwidth_gb_s": 30.0, "bytes_per_step": 1e9, "attained_gb_s": 1.0, "bandwidth_fraction": 0.1,
                "bandwidth_bound_tok_s": 30.0}
    table = roofline_table({"speed": {REF: {8150: speed(125.0, 4.0)}, "int4": {8150: speed(100.0, 8.0)}}})
    row = next(line for line in table.splitlines() if line.startswith("| `int4`"))
    assert "8.0 (2.00)" in row and "100 / 200 / 300 (1.25)" in row


def test_cli_refuses_no_decode_steps(capsys):
    from kvshrink.cli import main

    for steps in ("0", "1"):
        assert main(["bench", "--sections", "speed", "--decode-steps", steps, "--methods", "int4"]) == 2
        assert "decode steps must be at least 2" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [(["--sections", "speed", "--speed-contexts", "0"], "speed contexts must be"),
                                         (["--sections", "needle", "--needle-depths", "0.5,1.5"], "needle depths are"),
                                         (["--sections", "needle", "--needle-lengths", "0"], "needle lengths must be")])
def test_cli_refuses_empty_contexts_and_depths_outside_the_haystack(capsys, args, words):
    from kvshrink.cli import main

    assert main(["bench", "--methods", "int4", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_speed_protocol_times_every_step_round_robin(model, tiny_config):
    from transformers import DynamicCache

    from kvshrink.eval.speed import measure_speed
    from kvshrink.spec import spec_from_config

    makers = {"dynamic-fp32": lambda: DynamicCache(config=tiny_config),
              "int4": lambda: from_method("int4", model)}
    out = measure_speed(model, spec_from_config(tiny_config), makers, _ids(80), [40, 70], steps=3)
    for length in (40, 70):
        ref, r = out["dynamic-fp32"][length], out["int4"][length]
        assert len(r["decode_steps_ms"]) == 2 and r["decode_tok_s"] > 0  # the first of 3 not timed
        assert r["decode_p50_ms"] <= r["decode_p99_ms"] == r["decode_max_ms"]
        assert r["bytes_per_step"] == weight_bytes(model) + r["cache_bytes_end"]
        assert ref["ratio"] == pytest.approx(0.5) and r["ratio"] > 1  # against float16: fp32 holds twice as much
        # interleaved: step i of the reference starts before int4's step i, which starts before its step i + 1
        a, b = ref["decode_steps_at_s"], r["decode_steps_at_s"]
        assert a[0] == 0 and a[0] < b[0] < a[1] < b[1]
