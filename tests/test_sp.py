"""Sequence-parallel prefill and the head-sharded cache (kvshrink.dist), on 2 and 4 real processes
joined by torch.distributed over loopback (gloo)."""

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from kvshrink import KvshrinkError, from_method, prepare
from kvshrink.compat import with_cache
from kvshrink.dist.exchange import split
from kvshrink.dist.launch import FAULT, launch
from kvshrink.dist.sp import run_rank
from kvshrink.families.lowrank import transform as zdc

FLOAT = 4  # bytes of a float32 element: the model's own tensors cross as they are


@given(st.integers(0, 500), st.integers(1, 9))
def test_split_gives_each_item_to_one_rank_in_order(n, world):
    ranges = [split(n, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with 4 KV heads (one per rank of 4) saved where every process can load it, and
    its ZDC calibration where the zdc methods look for it."""
    folder = tmp_path_factory.mktemp("tiny-sp")
    os.environ["KVSHRINK_CALIB_DIR"] = str(tmp_path_factory.mktemp("calib"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    ids = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(1))
    zdc.calibrate(model, ids, {"test": True}).save(zdc.default_calibration_path(model))
    yield model, {"folder": str(folder)}
    del os.environ["KVSHRINK_CALIB_DIR"]


def _single(model, method, ids, new_tokens):
    """(prompt logits, greedy tokens) of one process with the method's cache."""
    m = prepare(model, method)
    with torch.no_grad():
        logits = m(ids, **with_cache(m, from_method(method, m))).logits[0]
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **with_cache(m, from_method(method, m)),
                         max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return logits, out[0, ids.shape[1]:].tolist()


def _prompt(n, seed=0, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_bundled_model_on_two_ranks_gives_the_single_process_logits_and_tokens(bundled):
    """fp16: uneven heads (3 KV heads: 2 + 1), every byte of k and v that crosses counted."""
    model, _ = bundled
    ids = _prompt(48, vocab=20000)
    ref, tokens = _single(model, "fp16", ids, 6)
    res = launch(run_rank, 2, (None, "fp16", ids, 6, True), timeout=300)
    got = torch.cat([r["logits"] for r in res])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert all(r["tokens"] == tokens for r in res)
    assert [r["heads"] for r in res] == [(0, 2), (2, 3)]
    layers, d = model.config.num_hidden_layers, model.config.head_dim
    for r, other in zip(res, reversed(res)):  # each sends its tokens of the other's heads, at full width
        s, e = r["token_range"]
        a, b = other["heads"]
        assert r["sent"]["k"] == r["sent"]["v"] == (e - s) * (b - a) * d * FLOAT * layers


def test_four_ranks_of_one_kv_head_each_decode_as_one_process(tiny):
    """int4: each rank's decode reads its head's codes through the compiled kernel (fp16 is checked on 2)."""
    model, source = tiny
    method = "int4"
    ids = _prompt(70, seed=2)
    ref, tokens = _single(model, method, ids, 5)
    res = launch(run_rank, 4, (source, method, ids, 5, True), timeout=300)
    torch.testing.assert_close(torch.cat([r["logits"] for r in res]), ref, rtol=1e-4, atol=1e-4)
    assert all(r["tokens"] == tokens for r in res)
    assert [r["heads"] for r in res] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert all(r["held"] > 0 for r in res)


def test_zdc_keys_and_values_cross_at_the_coordinates_their_cache_keeps(tiny):
    model, source = tiny
    method, world, n = "zdc-adaptive-50", 2, 200
    cache = from_method(method, prepare(model, method))
    res = launch(run_rank, world, (source, method, _prompt(n, seed=3), 2), timeout=300)
    sink, window, wide = cache.sink, cache.window, cache.ranks.sink_rank
    assert n > sink + window  # some tokens cross narrowed
    sent = full = 0
    for r in res:
        s, e = r["token_range"]
        n_wide = sum(p < sink or p >= n - window for p in range(s, e))
        other = res[1 - r["rank"]]["heads"]
        for kind, ranks in (("k", cache.ranks.k), ("v", cache.ranks.v)):
            want = sum(n_wide * wide + (e - s - n_wide) * int(ranks[layer, h])
                       for layer in range(ranks.shape[0]) for h in range(*other))
            assert r["sent"][kind] == want * FLOAT
            sent += r["sent"][kind]
            full += (e - s) * (other[1] - other[0]) * model.config.head_dim * ranks.shape[0] * FLOAT
    assert sent < 0.8 * full  # half the dimensions in the budget, all of them for the sink and window tokens


def test_a_failing_rank_stops_every_rank_with_one_line(tiny, monkeypatch):
    _, source = tiny
    monkeypatch.setenv(FAULT, "1")
    start = time.monotonic()
    with pytest.raises(KvshrinkError, match=r"^rank 1 of 2 failed: fault injected on rank 1"):
        launch(run_rank, 2, (source, "fp16", _prompt(16), 2), timeout=120)
    assert time.monotonic() - start < 100  # not the collective's timeout: the others were stopped


def test_cli_refuses_a_method_it_cannot_shard_in_one_line():
    out = subprocess.run([sys.executable, "-m", "kvshrink.cli", "generate", "--prompt", "hi", "--nproc", "2",
                          "--method", "kvc-8x", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be split by KV heads" in lines[0], out.stderr
