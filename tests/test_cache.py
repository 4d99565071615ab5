"""CompressedCache on a tiny random Llama: layout, bytes, generate, batches, crop."""

import pytest
import torch
from transformers import DynamicCache

from kvshrink import CompressedCache, IntQuant, KvshrinkError, from_method
from kvshrink.codecs.base import tensor_nbytes
from kvshrink.core import hostmem
from kvshrink.eval.needle import fill, prefill_states


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _chunked_logits(model, cache, ids, chunk):
    return torch.cat([model(ids[:, s:s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)], 1)


def test_fp16_method_matches_dynamic_cache(tiny_model, tiny_config):
    ids = _ids(200)
    ref = _chunked_logits(tiny_model, DynamicCache(), ids, 16)
    got = _chunked_logits(tiny_model, from_method("fp16", tiny_config), ids, 16)
    assert (ref - got).abs().max() < 1e-3


def test_layout_counts_and_bytes(tiny_model, tiny_config):
    cache = from_method("int4", tiny_config, window=8, sink=4, block=32)
    _chunked_logits(tiny_model, cache, _ids(150), 10)  # calls over 8 tokens code through the stage
    layer = cache.layers[0]
    k, v = layer.k, layer.v
    # 4 sink, 8 window, 138 left = 4 blocks of 32 + 10 staged (keys: 6-bit rotated stage; values: their own codes)
    assert (k.sink.shape[-2], k.body.num_tokens, k.stage.num_tokens, k.window.shape[-2]) == (4, 128, 10, 8)
    assert (v.sink.shape[-2], v.body.num_tokens + v.stage.num_tokens, v.window.shape[-2]) == (4, 138, 8)
    assert v.stage.num_tokens < 32  # the value body grows once per block, not per token
    assert (k.stage_codec.bits, k.stage_codec.rotate) == (6, True) and v.stage_codec is v.codec
    assert cache.get_seq_length() == 150
    tensors = [t for layer in cache.layers for t in layer.tensors()]
    # nbytes is the storage of the tensors themselves, and no storage is shared or oversized
    assert cache.nbytes() == tensor_nbytes(tensors) == sum(t.untyped_storage().nbytes() for t in tensors)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    b, h, d = 1, tiny_config.num_key_value_heads, 16
    fp16 = 2 * 12 * b * h * d * 2
    key_body = b * h * 128 * d // 2 + b * h * 4 * d * 4
    key_stage = b * h * 10 * d * 6 // 8 + b * h * 10 * 4
    val_body = b * h * 138 * d // 2 + b * h * 138 * 4  # body + stage, same per-token codes
    assert cache.nbytes() == tiny_config.num_hidden_layers * (fp16 + key_body + key_stage + val_body)
    assert cache.fp16_nbytes() == tiny_config.num_hidden_layers * 2 * b * h * 150 * d * 2
    assert cache.compression_ratio() == cache.fp16_nbytes() / cache.nbytes()


def test_a_coded_window_holds_the_last_tokens_as_their_own_codes(tiny_config):
    """window_codec: the window's tokens are per-token codes (their bytes counted, no float16 copy), each the
    round trip of its own token whatever the call sizes; decode steps' tokens wait in float16 until `gather`
    (8) of them are coded together; tokens leave oldest first into the stage and body; crop and batch selection
    keep it."""
    wc = IntQuant(8, "token", rotate=True, seed=4)
    cache = CompressedCache(num_layers=1, key_codec=IntQuant(2, "channel", 32, rotate=True, seed=1),
                            value_codec=IntQuant(2, "token", rotate=True, seed=2), sink=4, window=8, block=32,
                            window_codec=wc)
    layer, g = cache.layers[0], torch.Generator().manual_seed(0)
    ks, vs = torch.randn(2, 2, 120, 16, generator=g), torch.randn(2, 2, 120, 16, generator=g)
    layer.update(ks[:, :, :100], vs[:, :, :100])
    for i in range(100, 120):  # decode steps: one token each
        layer.update(ks[:, :, i:i + 1], vs[:, :, i:i + 1])
    for store, x in ((layer.k, ks), (layer.v, vs)):
        # 16 decode tokens coded in two groups of 8 (as 8 older ones left), the last 4 waiting in float16
        assert store.window_tokens() == 12 and store.tail.shape[-2] == 4 and len(store) == 120
        want = torch.cat([wc.decode(wc.encode(x[:, :, 108:116].half().float(), 1)), x[:, :, 116:].half().float()], -2)
        torch.testing.assert_close(store.window_dense(torch.float32), want, rtol=0, atol=1e-6)
        assert store.window.nbytes() == 8 * wc.nbytes(wc.encode(x[:, :, :1], 1))
        # the full history ends with the window's tokens; what left it is coded at 2 bits, close to the input
        full = store.decoded(torch.float32)
        torch.testing.assert_close(full[:, :, -12:], want, rtol=0, atol=1e-6)
        assert (full[:, :, 4:108] - x[:, :, 4:108]).abs().mean() < 0.5
    assert cache.nbytes() == tensor_nbytes([t for s in (layer.k, layer.v) for t in s.tensors()])
    cache.crop(-5)  # into the coded part: the tail goes, the codes are cut
    assert (layer.k.window_tokens(), layer.k.tail.shape[-2], layer.get_seq_length()) == (7, 0, 115)
    torch.testing.assert_close(layer.v.window_dense(torch.float32), want[:, :, :7], rtol=0, atol=1e-6)
    cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.v.window_dense(torch.float32), want[1:, :, :7], rtol=0, atol=1e-6)
    more = torch.randn(1, 2, 10, 16, generator=g)  # a longer call: no tail, the window back to 8 codes
    layer.update(more, more)
    assert (layer.k.window_tokens(), layer.k.tail.shape[-2], layer.k.window.num_tokens) == (8, 0, 8)
    torch.testing.assert_close(layer.k.window_dense(torch.float32), wc.decode(wc.encode(more[:, :, 2:].half().float(), 1)),
                               rtol=0, atol=1e-6)
    with pytest.raises(KvshrinkError, match="codes each token alone"):
        CompressedCache(num_layers=1, key_codec=IntQuant(4), window=8, window_codec=IntQuant(8, "channel", 32))


def test_eight_bit_scales_hold_two_bytes_less_per_value_token(tiny_model, tiny_config):
    """int2-rot:levels=gauss:scales=8bit: every coded value token (body and stage) two bytes lighter per
    head, every key group (a channel over a block) too, and the logits close to the float16-scale cache's."""
    ids = _ids(150)
    caches = {sc: from_method(f"int2-rot:levels=gauss:scales={sc}", tiny_config, sink=4, block=32)
              for sc in ("fp16", "8bit")}
    logits = {sc: torch.log_softmax(_chunked_logits(tiny_model, c, ids, 10), -1) for sc, c in caches.items()}
    h = tiny_config.num_key_value_heads
    values, key_groups = 150 - 4, (150 - 4) // 32 * 16  # 4 blocks of 32 tokens, 16 channels each
    assert caches["fp16"].nbytes() - caches["8bit"].nbytes() == tiny_config.num_hidden_layers * h * (values + key_groups) * 2
    assert caches["8bit"].layers[0].v.body.tensors["scale"].dtype == torch.uint8
    ref = torch.log_softmax(_chunked_logits(tiny_model, DynamicCache(), ids, 10), -1)
    err = {sc: float((x - ref).abs().max()) for sc, x in logits.items()}
    assert err["8bit"] < 1.5 * err["fp16"] + 1e-3
    with pytest.raises(KvshrinkError, match="scales=8bit needs levels=gauss"):
        from_method("int2-rot:scales=8bit", tiny_config)


def test_compressed_logits_close_and_int8_closer(tiny_model, tiny_config):
    ids = _ids(160)
    ref = torch.log_softmax(_chunked_logits(tiny_model, DynamicCache(), ids, 32), -1)
    errs = {}
    for name in ("int8", "int4", "int2"):
        got = torch.log_softmax(_chunked_logits(tiny_model, from_method(name, tiny_config, block=32), ids, 32), -1)
        errs[name] = (ref - got).abs().max().item()
    assert errs["int8"] < errs["int4"] < errs["int2"]
    assert errs["int8"] < 1e-2


def test_generate_batch_left_padding_matches_single(tiny_model, tiny_config):
    a, b = _ids(40, seed=1), _ids(25, seed=2)
    pad = torch.zeros(1, 15, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 40), torch.cat([torch.zeros(1, 15), torch.ones(1, 25)], 1)]).long()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = tiny_model.generate(input_ids=batch, attention_mask=mask,
                              past_key_values=from_method("fp16", tiny_config), **kw)
    for row, single in ((0, a), (1, b)):
        alone = tiny_model.generate(input_ids=single, attention_mask=torch.ones_like(single),
                                    past_key_values=from_method("fp16", tiny_config), **kw)
        assert torch.equal(out[row, -12:], alone[0, -12:])
    # a quantized cache under generate: runs to length and holds real compressed bytes
    cache = from_method("int4", tiny_config, block=16)
    out = tiny_model.generate(input_ids=batch, attention_mask=mask, past_key_values=cache, **kw)
    assert out.shape == (2, 52) and cache.get_seq_length() == 51
    assert cache.compression_ratio() > 1.5


def test_crop_keeps_the_prefix_exactly(tiny_model, tiny_config):
    ids = _ids(120)
    cache = from_method("int4", tiny_config, block=32, window=4)
    _chunked_logits(tiny_model, cache, ids, 20)
    before = [(l.k.decoded(torch.float32), l.v.decoded(torch.float32)) for l in cache.layers]
    for cut in (-3, -30, -70, -18):  # window, stage, body, sink
        cache.crop(cut)
        n = cache.get_seq_length()
        for layer, (k, v) in zip(cache.layers, before):
            # the cut block's kept tokens move to the float16 window: equal up to float16 rounding
            torch.testing.assert_close(layer.k.decoded(torch.float32), k[..., :n, :], rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(layer.v.decoded(torch.float32), v[..., :n, :], rtol=1e-3, atol=1e-4)
        before = [(l.k.decoded(torch.float32), l.v.decoded(torch.float32)) for l in cache.layers]
    assert cache.get_seq_length() == 0
    # a chat continues from a cropped cache
    cache = from_method("int4", tiny_config, block=32)
    _chunked_logits(tiny_model, cache, ids, 40)
    cache.crop(-50)
    assert cache.get_seq_length() == 70
    _chunked_logits(tiny_model, cache, _ids(30, seed=5), 10)
    assert cache.get_seq_length() == 100
    with pytest.raises(KvshrinkError):
        cache.crop(5)


def test_shared_prefill_fill_equals_prefill_through_cache(tiny_model, tiny_config):
    ids = _ids(100)
    direct = from_method("int3", tiny_config, block=32)
    with torch.no_grad():
        tiny_model(ids, past_key_values=direct)
    filled = from_method("int3", tiny_config, block=32)
    fill(filled, prefill_states(tiny_model, ids))
    for a, b in zip(direct.layers, filled.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y)


def test_batch_select_and_reorder(tiny_model, tiny_config):
    ids = _ids(70, batch=3)
    cache = from_method("int4", tiny_config, block=32)
    _chunked_logits(tiny_model, cache, ids, 35)
    full = [l.k.decoded(torch.float32) for l in cache.layers]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[0].k.decoded(torch.float32), full[0][[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[1].k.decoded(torch.float32), full[1][[0]])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].k.decoded(torch.float32).shape[0] == 2


def test_codec_objects_and_bad_options(tiny_config):
    cache = CompressedCache(tiny_config, key_codec=IntQuant(3, "channel", 64), value_codec=IntQuant(2), block=64)
    assert "int3" in cache.describe() and len(cache.layers) == 2
    with pytest.raises(KvshrinkError, match="not a multiple"):
        CompressedCache(tiny_config, key_codec=IntQuant(4, "channel", 64), block=96)
    with pytest.raises(KvshrinkError, match="unknown method"):
        from_method("int5", tiny_config)
    with pytest.raises(KvshrinkError, match="window"):
        from_method("int4", tiny_config, window=-1)


def test_per_token_values_are_coded_once_whatever_the_chunking(tiny_model, tiny_config):
    """Values coded in one shot and values coded block by block from decode steps (which wait in
    float16 until a block fills) hold the same codes; the waiting tokens are their float16 selves."""
    ids = _ids(100)
    states = prefill_states(tiny_model, ids)
    one = from_method("int4", tiny_config, block=32)
    fill(one, states)
    steps = from_method("int4", tiny_config, block=32)
    for t in range(100):
        for i, (k, v) in enumerate(states):
            steps.update(k[..., t:t + 1, :], v[..., t:t + 1, :], i)
    for i, (a, b) in enumerate(zip(one.layers, steps.layers)):
        b.v.settle()
        assert a.v.tokens_in(a.v.body) == b.v.tokens_in(b.v.body) == 96
        for name, t in a.v.body.tensors.items():
            assert torch.equal(t, b.v.body.tensors[name])
        assert torch.equal(b.v.fresh, states[i][1][..., 100 - b.v.fresh.shape[-2]:, :].half())
        assert b.v.stage is None and b.v.fresh.shape[-2] == 100 - 4 - 96


def test_decoding_holds_a_prompts_bytes_plus_at_most_gather_float16_tokens(tiny_model, tiny_config):
    """Decode steps stage their tokens as codes every `gather` steps, the codes a prompt's tokens get:
    at every length the cache holds what a prompt of that length holds, except that its waiting
    float16 tokens (fewer than `gather`) replace their staged codes."""
    ids = _ids(80)
    states = prefill_states(tiny_model, ids)
    steps = from_method("int4:block=32", tiny_config)
    gather = steps.layers[0].k.gather
    assert gather is not None and gather < 32
    seen = set()
    for t in range(80):
        for i, (k, v) in enumerate(states):
            steps.update(k[..., t:t + 1, :], v[..., t:t + 1, :], i)
        prompt = from_method("int4:block=32", tiny_config)
        fill(prompt, [(k[..., :t + 1, :], v[..., :t + 1, :]) for k, v in states])
        for a, b in zip(prompt.layers, steps.layers):
            for sa, sb, x in ((a.k, b.k, states[0][0]), (a.v, b.v, states[0][1])):
                sb.settle()
                waiting = sb.fresh.shape[-2]
                assert waiting < gather and sb.tokens_in(sb.body) == sa.tokens_in(sa.body)
                seen.add(waiting)
                staged = tensor_nbytes(list(sb.stage_codec.encode(x[..., :1, :].float(), 1).tensors.values()))
                float16 = x[..., :1, :].numel() * 2
                assert sb.nbytes() - sa.nbytes() == waiting * (float16 - staged)
    assert seen == set(range(gather))  # every count of waiting tokens was seen


def test_method_options_in_the_name(tiny_config):
    cache = from_method("int4:window=16:block=64", tiny_config)
    assert (cache.window, cache.block, cache.method) == (16, 64, "int4:window=16:block=64")
    assert from_method("int2-rot:key_axis=token", tiny_config).key_codec.axis == "token"
    with pytest.raises(KvshrinkError, match="unknown option 'bits'"):
        from_method("int4:bits=3", tiny_config)
    with pytest.raises(KvshrinkError, match="needs an integer"):
        from_method("int4:window=big", tiny_config)
    with pytest.raises(KvshrinkError, match="unknown key_axis"):
        from_method("int4:key_axis=diagonal", tiny_config)


def test_needle_records_a_failing_peer_and_raises_for_ours(tiny_model, tiny_config):
    from transformers import DynamicCache

    from kvshrink.eval.needle import run_needles

    class Tok:  # just enough tokenizer for make_case
        eos_token_id = 2

        def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
            return "<u>" + msgs[0]["content"] + "</u>"

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            ids = [3 + (hash(w) % 100) for w in text.split()]
            t = torch.tensor([ids])
            return type("E", (), {"input_ids": t if return_tensors else ids})()

        def decode(self, ids):
            return " ".join(map(str, ids))

    def broken():
        raise RuntimeError("peer cannot pack this length")

    res = run_needles(tiny_model, Tok(), {"ref": DynamicCache, "peer": broken}, [200], [0.5], kinds=("noise",),
                      tolerate=("peer",))
    assert res["peer"]["errors"] == 1 and res["peer"]["score"] == 0 and "cannot pack" in res["peer"]["cases"][0]["error"]
    with pytest.raises(RuntimeError):
        run_needles(tiny_model, Tok(), {"ours": broken}, [200], [0.5], kinds=("noise",))


@pytest.mark.skipif(not hostmem.AVAILABLE, reason="no glibc malloc_trim on this system")
def test_a_long_update_hands_freed_memory_back_once_the_process_has_grown(tiny_config, monkeypatch):
    """A prompt's coding temporaries, freed, go back to the system after a long update (core/hostmem.py),
    when the process has grown by GROWTH since the last time; decode steps and short chunks never pay."""
    calls = []
    monkeypatch.setattr(hostmem, "release", lambda: calls.append(1) or True)
    cache = from_method("int4", tiny_config)
    x = torch.randn(1, 2, hostmem.LONG_UPDATE, 16)
    monkeypatch.setattr(hostmem, "GROWTH", 0)  # grown enough, always
    cache.update(x, x, 0)
    assert calls == [1]
    cache.update(x[:, :, :hostmem.LONG_UPDATE - 1], x[:, :, :hostmem.LONG_UPDATE - 1], 1)  # a shorter update
    cache.update(x[:, :, :1], x[:, :, :1], 0)  # a decode step
    assert calls == [1]
    monkeypatch.setattr(hostmem, "GROWTH", 1 << 50)  # not grown enough
    cache.update(x, x, 1)
    assert calls == [1]
    assert cache.get_seq_length(0) == hostmem.LONG_UPDATE + 1  # the updates themselves went through
