"""Every decoder family users run, as tiny random models built from their transformers configs (no
download): each family's real head_dim, GQA ratio, norms, biases, attention scaling, soft-capping
and layer types. Each runs through the methods of every family of ours (README: "Architectures").

Properties:
- fp16 gives DynamicCache's logits (DynamicCache built from the config: transformers' own sliding
  layers), int8 within a tight tolerance, int4's compiled path equals its reference path;
- ZDC at full rank gives the original model's logits (folding handles biases, fused qkv projections
  and q/k norms, which act before the cached keys);
- a sliding layer holds a bounded number of tokens over a context 5x its window, and the ratio
  counts against what an fp16 sliding layer holds;
- eviction and RVQ run or refuse in one line, and the refusal names the reason.
"""

import copy

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM, DynamicCache

from kvshrink import KvshrinkError, from_method, load_cache, prepare
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.rvq import calibrate as rvq_calib
from kvshrink.spec import spec_from_config

WINDOW, BLOCK = 24, 8
COMMON = dict(vocab_size=128, num_hidden_layers=3, intermediate_size=64, max_position_embeddings=1024,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family -> (config class, options): each family's own head_dim, GQA ratio, biases, norms, scaling, layer types
ARCHS = {
    "llama": ("LlamaConfig", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "mistral": ("MistralConfig", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                      sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=128)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    sliding_window=WINDOW, attn_logit_softcapping=20.0, query_pre_attn_scalar=64)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                        sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(hidden_size=384, num_attention_heads=4, num_key_value_heads=2,
                                partial_rotary_factor=0.5)),  # fused qkv_proj, head_dim 96
    "olmo2": ("Olmo2Config", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2)),  # q/k norm, MHA
    "granite": ("GraniteConfig", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                      attention_multiplier=0.05, attention_bias=True)),
}
SLIDING = ("mistral", "gemma2", "gemma3")


def _ids(n, seed=0, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    """(name, model): a tiny random model of the family, float32, its ZDC calibration where methods look."""
    name = request.param
    cls, options = ARCHS[name]
    config = getattr(T, cls)(**COMMON, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norm weights, so folding them is tested
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    with pytest.MonkeyPatch.context() as env:  # restored after, whatever it was (a user's own included)
        env.setenv("KVSHRINK_CALIB_DIR", str(tmp_path_factory.mktemp(f"calib-{name}")))
        yield name, model


@torch.no_grad()
def _run(model, cache, ids, chunk=16, steps=6):
    """Chunked prefill of `ids`, then decode steps of fixed tokens: the logits of the last chunk and
    every step (B, chunk + steps, vocab)."""
    out = []
    for s in range(0, ids.shape[1], chunk):
        out = [model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True).logits]
    for t in _ids(steps, seed=9)[0]:
        out.append(model(t.view(1, 1).expand(ids.shape[0], 1), past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def _ready(model, method):
    return prepare(copy.deepcopy(model), method)


def _reference(model, ids):
    return _run(model, DynamicCache(config=model.config), ids)


def test_fp16_gives_dynamic_cache_logits(arch):
    name, model = arch
    ids = _ids(5 * WINDOW)
    ref = _reference(model, ids)
    m = _ready(model, "fp16")
    got = _run(m, from_method(f"fp16:block={BLOCK}", m), ids)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_int_codes_close_and_fused_equals_reference(arch, method):
    """Each decode step is taken twice on the same codes: by the compiled kernel, and by a copy of the
    cache that decodes them first (two caches filled apart may code a token one level apart)."""
    name, model = arch
    ids = _ids(5 * WINDOW, seed=1)
    ref = _reference(model, ids)
    m = _ready(model, method)
    cache = from_method(f"{method}:block={BLOCK}", m)
    _run(m, cache, ids[:, :-8], steps=0)
    fused, plain = [], []
    with torch.no_grad():  # the last prefill chunk, then decode steps
        for x in [ids[:, -8:]] + list(_ids(6, seed=9).view(6, 1, 1)):
            other = cache.decoding_copy()
            fused.append(m(x, past_key_values=cache, use_cache=True).logits)
            plain.append(m(x, past_key_values=other, use_cache=True).logits)
    fused, plain = torch.cat(fused, 1), torch.cat(plain, 1)
    assert not torch.equal(fused, plain)  # two paths really ran
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    bound = {"int8": 0.02, "int4": 0.3}[method]
    assert (fused - ref).abs().max() < bound * ref.abs().max()


def test_zdc_at_full_rank_gives_the_model_logits(arch):
    name, model = arch
    ids = _ids(5 * WINDOW, seed=2)
    ref = _reference(model, ids)
    calib = zdc.calibrate(model, _ids(48, seed=3, batch=2), {"test": True})
    calib.save(zdc.default_calibration_path(model))
    m = prepare(model, "zdc-50")  # a transformed copy
    for attend in ("fused", "decode"):
        got = _run(m, from_method(f"zdc-50:block={BLOCK}:attend={attend}", m, pct=100), ids)
        assert (got - ref).abs().max() < 5e-3 * ref.abs().max(), attend


@pytest.mark.parametrize("method,chunk", [("int4", 16), ("kvcomp-eb0.1", 16), ("kvcomp-eb0.1", 1000)])
def test_sliding_layers_hold_bounded_memory(arch, method, chunk):
    name, model = arch
    spec = spec_from_config(model.config)
    m = _ready(model, method)
    block = BLOCK if method == "int4" else 128  # KVComp's blocks: 64 key tokens, 128 value tokens
    sizes = []
    for n in (4 * WINDOW + 2 * block, 10 * WINDOW + 2 * block, 20 * WINDOW + 2 * block):
        cache = from_method(f"int4:block={BLOCK}" if method == "int4" else method, m)
        _run(m, cache, _ids(n, seed=4), chunk=chunk, steps=3)
        for layer in cache.layers:  # nothing freed is kept alive by a view of it
            ts = layer.tensors()
            assert sum(t.untyped_storage().nbytes() for t in ts) == sum(t.numel() * t.element_size() for t in ts)
        kinds = cache.bytes_by_kind()
        sizes.append(kinds.get("sliding", (0, 0))[0])
        for i, layer in enumerate(cache.layers):
            assert layer.get_seq_length() == n + 3
            if spec.is_sliding(i):
                assert layer.is_sliding and WINDOW - 1 <= layer.held() < WINDOW - 1 + 2 * block
            else:
                assert not layer.is_sliding and layer.held() == n + 3
        assert cache.nbytes() == sum(held for held, _ in kinds.values())
        # the ratio's reference: what an fp16 cache holds (transformers' sliding layers keep window - 1 tokens)
        assert cache.fp16_nbytes() == sum(f for _, f in kinds.values()) == spec.fp16_bytes(n + 3)
        dyn = DynamicCache(config=m.config)
        _run(m, dyn, _ids(n, seed=4), steps=3)
        assert spec.fp16_bytes(n + 3) == sum(layer.keys.numel() * 4 for layer in dyn.layers)  # float32: x2
    if name in SLIDING:
        if method == "int4":  # bounded: 10x and 20x the window hold the same bytes
            assert sizes[1] == sizes[2] > 0
        else:  # entropy-coded: the bytes follow the content, the tokens held are bounded as above
            assert 0 < sizes[2] < 1.25 * sizes[1]
        assert "slide over" in cache.describe()
    else:
        assert sizes == [0, 0, 0]


def test_eviction_runs_or_refuses_in_one_line(arch):
    name, model = arch
    m = _ready(model, "kvc-4x")
    if name in SLIDING:
        with pytest.raises(KvshrinkError, match="sliding-window layers") as err:
            from_method("kvc-4x", m)
        assert "\n" not in str(err.value)
        return
    cache = from_method("kvc-4x:block=4", m)
    logits = _run(m, cache, _ids(96, seed=5))
    kept = cache.kept_tokens()  # (B, layers, heads)
    assert torch.isfinite(logits).all() and kept.sum() <= 102 * kept[0].numel() / 4 + 8 * kept[0].numel()


def test_kvcomp_within_its_bound_and_fused_equals_reference(arch):
    name, model = arch
    ids = _ids(5 * WINDOW, seed=6)
    ref = _reference(model, ids)
    m = _ready(model, "kvcomp-eb0.1")
    got = _run(m, from_method("kvcomp-eb0.1", m), ids)
    plain = _run(m, from_method("kvcomp-eb0.1:attend=decode", m), ids)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (got - ref).abs().max() < 0.3 * ref.abs().max()


def test_rvq_runs_and_its_kernel_equals_its_reference(arch):
    name, model = arch
    ids = _ids(5 * WINDOW, seed=8)
    ref = _reference(model, ids)
    rvq_calib.calibrate(model, _ids(48, seed=3, batch=2), {"test": True}, 16, 256, 8, "strided", "contiguous",
                        iters=3).save(rvq_calib.default_path(model, 16, 256, "strided", "contiguous"))
    m = _ready(model, "rvq-d4")
    fused = _run(m, from_method("rvq-d4", m), ids)
    plain = _run(m, from_method("rvq-d4:attend=decode", m), ids)
    # no bound against the reference here: on these random models every 2-bit-class code (int2 as well) moves
    # the logits by 0.2-0.9 of their range; the bundled model's figures are the bench's
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert torch.isfinite(fused).all()


def test_cache_keyword_and_past_key_values_agree(arch):
    name, model = arch
    m = _ready(model, "int4")
    ids = _ids(40, seed=7)
    with torch.no_grad():
        a = m(ids, cache=from_method(f"int4:block={BLOCK}", m)).logits
        b = m(ids, past_key_values=from_method(f"int4:block={BLOCK}", m)).logits
    assert torch.equal(a, b)


def test_transformers_quantized_cache_refuses_sliding_models_in_one_line(arch):
    name, model = arch
    if name not in SLIDING:
        assert from_method("hf-quanto-int4", model).layers  # it serves full attention
        return
    with pytest.raises(KvshrinkError, match="QuantizedCache serves full-attention layers only"):
        from_method("hf-quanto-int4", model)


def test_a_sliding_layer_crops_within_what_it_holds_and_refuses_beyond(arch):
    name, model = arch
    if name not in SLIDING:
        return
    m = _ready(model, "int4")
    cache = from_method(f"int4:block={BLOCK}", m)
    _run(m, cache, _ids(5 * WINDOW, seed=10), steps=0)
    sliding = next(layer for layer in cache.layers if layer.is_sliding)
    spare = sliding.held() - (WINDOW - 1)  # tokens beyond the window that the layer still holds
    total = cache.get_seq_length()
    if spare:
        cache.crop(-spare)
        assert cache.get_seq_length() == total - spare and sliding.held() == WINDOW - 1
    with pytest.raises(KvshrinkError, match="can drop at most 0 of them, not 1"):
        cache.crop(-1)


def test_rope_frequencies_and_turned_keys_on_every_family(arch):
    """The spec's RoPE frequencies are those the model turns its full-attention keys by (partial rotary,
    per-layer-type RoPE included), so int4 with keys turned back within groups stays close to the
    model, and its kernel gives what decoding gives."""
    name, model = arch
    bufs = dict(model.model.rotary_emb.named_buffers())
    inv = bufs.get("inv_freq", bufs.get("full_attention_inv_freq"))
    torch.testing.assert_close(torch.tensor(spec_from_config(model.config).rope, dtype=torch.float64), inv.double(),
                               rtol=1e-6, atol=0)
    ids = _ids(5 * WINDOW, seed=4)
    ref = _reference(model, ids)
    m = _ready(model, "int4:prerope=true")
    fused = _run(m, from_method(f"int4:prerope=true:block={BLOCK}", m), ids)
    plain = _run(m, from_method(f"int4:prerope=true:block={BLOCK}:attend=decode", m), ids)
    # two caches fed alike may still store a new key one float16 step apart (the kernel's sums and decoding's
    # differ in the last bit), which the block's codes then widen: equal to well within the codes' own error
    # (tests/test_fused.py checks the kernel against decoding on the same codes, to float rounding)
    err = (plain - ref).abs().max().item()
    assert (fused - plain).abs().max() < 0.02 * err
    assert (fused - ref).abs().max() < 0.3 * ref.abs().max()


def test_scaled_rope_types_give_their_scaled_frequencies():
    config = T.LlamaConfig(**COMMON, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    model = AutoModelForCausalLM.from_config(config)
    plain = 500000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    rope = torch.tensor(spec_from_config(config).rope, dtype=torch.float64)
    torch.testing.assert_close(rope, model.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    assert not torch.allclose(rope, plain)  # the scaling changed the low frequencies


def test_a_saved_cache_resumes_on_every_family(arch, tmp_path):
    """Saved after a prompt 10 windows long (a sliding layer has freed its oldest blocks), read back, and fed the
    same tokens: the same logits bit for bit, the same tokens held and seen."""
    name, model = arch
    m = _ready(model, "int4")
    cache = from_method(f"int4:block={BLOCK}", m)
    _run(m, cache, _ids(10 * WINDOW, seed=5), steps=2)
    path = str(tmp_path / "chat.safetensors")
    cache.save(path, m)
    loaded = load_cache(path, m)
    for a, b in zip(cache.layers, loaded.layers):
        assert (a.get_seq_length(), a.held(), a.is_sliding) == (b.get_seq_length(), b.held(), b.is_sliding)
    assert (name in SLIDING) == any(a.held() < a.get_seq_length() for a in cache.layers)
    with torch.no_grad():
        for x in _ids(12, seed=6).view(12, 1, 1):
            assert torch.equal(m(x, past_key_values=loaded, use_cache=True).logits,
                               m(x, past_key_values=cache, use_cache=True).logits)
