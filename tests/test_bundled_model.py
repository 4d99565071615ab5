"""End to end on the bundled SmolLM2-135M with short slices of WikiText-2 (DESIGN.md protocol)."""

import pytest
import torch
from transformers import DynamicCache

from kvshrink import KvshrinkError, from_method
from kvshrink.core.cache import cache_nbytes
from kvshrink.corpus import load_corpus_ids, segments
from kvshrink.eval.needle import run_needles
from kvshrink.eval.perplexity import REFERENCE, evaluate_quality
from kvshrink.spec import spec_from_config

pytestmark = pytest.mark.model


def test_spec_of_the_bundled_model(bundled):
    spec = spec_from_config(bundled[0].config)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context) == (30, 9, 3, 64, 8192)


def test_perplexity_protocol_orders_methods(bundled):
    model, tok = bundled
    cfg = model.config
    segs = segments(load_corpus_ids(tok, max_tokens=1024), 512, 1)
    names = ("fp16", "int8", "int4", "int2")
    res = evaluate_quality(model, spec_from_config(cfg), {n: (lambda n=n: from_method(n, cfg)) for n in names},
                           segs, chunk=64)
    assert res[REFERENCE]["tokens"] == 511 and 5 < res[REFERENCE]["ppl"] < 60
    assert abs(res["fp16"]["ppl_change"]) < 1e-3 and res["fp16"]["top1"] > 0.99
    assert abs(res["int8"]["ppl_change"]) < 0.005
    assert res["int8"]["kl"] < res["int4"]["kl"] < res["int2"]["kl"]
    assert res["int4"]["ppl_change"] < 0.03 and res["int4"]["top1"] > 0.9
    assert res["fp16"]["ratio"] == pytest.approx(1.0)
    assert 3.0 < res["int4"]["ratio"] < 3.6 and res["int2"]["ratio"] > 4.5


def test_needle_found_with_uncompressed_and_int8(bundled):
    model, tok = bundled
    make = {"ref": DynamicCache, "int8": lambda: from_method("int8", model.config)}
    res = run_needles(model, tok, make, [1024], [0.5], kinds=("noise",))
    assert res["ref"]["score"] == 1.0 and res["int8"]["score"] == 1.0


def test_generate_and_peer_byte_accounting(bundled):
    model, tok = bundled
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).input_ids
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    ref = model.generate(**kw)
    cache = from_method("fp16", model.config)
    assert torch.equal(model.generate(past_key_values=cache, **kw), ref)
    assert cache_nbytes(cache) == cache.get_seq_length() * spec_from_config(model.config).fp16_bytes_per_token()
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    peer = QuantizedCache(backend="quanto", config=model.config, nbits=4)
    model.generate(past_key_values=peer, **kw)
    n = peer.get_seq_length()
    held = cache_nbytes(peer)
    # quanto packs 4-bit codes two to a byte, plus scales/shifts, plus the fp32 residual window
    assert 0 < held < n * spec_from_config(model.config).fp16_bytes_per_token() * 2
    assert held > sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in peer.layers)


@pytest.mark.parametrize("kind", ["noise", "distractor"])
def test_needle_cases_fit_their_length(bundled, kind):
    from kvshrink.eval.needle import ANSWER_TOKENS, make_case

    for length in (2048, 8192):
        case = make_case(bundled[1], length, 0.9, kind)
        total = case.context.shape[1] + case.question.shape[1] + ANSWER_TOKENS
        assert length - 200 < total <= length


def test_a_needle_case_too_short_for_a_haystack_is_refused(bundled):
    from kvshrink.eval.needle import make_case

    with pytest.raises(KvshrinkError, match=r"distractor needle case of 120 tokens leaves no room.*use at least (\d+)"):
        make_case(bundled[1], 120, 0.5, "distractor")
    with pytest.raises(KvshrinkError, match="0 to 1; got 1.5"):
        make_case(bundled[1], 2048, 1.5, "noise")
    for kind in ("noise", "distractor"):  # the least it names holds one sentence of haystack
        with pytest.raises(KvshrinkError) as refused:
            make_case(bundled[1], 120, 0.5, kind)
        least = int(str(refused.value).rsplit(" ", 1)[-1])
        case = make_case(bundled[1], least, 0.5, kind)
        assert case.context.shape[1] + case.question.shape[1] <= least


def test_needle_cases_for_a_base_model_without_a_chat_template(bundled):
    """A base model (Gemma 3 270M has no chat template): the same question as a plain prompt."""
    import copy

    from kvshrink.eval.needle import ANSWER_TOKENS, make_case

    tok = copy.deepcopy(bundled[1])
    tok.chat_template = None
    case = make_case(tok, 2048, 0.5, "noise")
    text = tok.decode(case.context[0]) + tok.decode(case.question[0])
    assert "assistant" not in text and "user" not in text and "special magic number for" in text  # no chat roles
    assert 2048 - 200 < case.context.shape[1] + case.question.shape[1] + ANSWER_TOKENS <= 2048
