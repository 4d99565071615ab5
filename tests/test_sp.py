"""Sequence-parallel prefill and the head-sharded cache (kvshrink.dist), on 2 and 4 real processes
joined by torch.distributed over loopback (gloo)."""

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from kvshrink import KvshrinkError, from_method, prepare
from kvshrink.cli import main
from kvshrink.compat import with_cache
from kvshrink.dist.exchange import split
from kvshrink.dist.launch import FAULT, free_port, launch
from kvshrink.dist.sp import check, run_rank
from kvshrink.dist.wire import GROUP, Wire, wire_from_name
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
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    ids = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as env:  # restored after, whatever it was
        env.setenv("KVSHRINK_CALIB_DIR", str(tmp_path_factory.mktemp("calib")))
        zdc.calibrate(model, ids, {"test": True}).save(zdc.default_calibration_path(model))
        yield model, {"folder": str(folder)}


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


SLIDING = {  # tiny sliding-window families: Mistral (every layer), Gemma 2 (every other, soft-capped), Gemma 3
    "mistral": ("MistralConfig", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    attn_logit_softcapping=20.0, query_pre_attn_scalar=32)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        layer_types=["sliding_attention", "full_attention"])),
}


def _sliding_model(family):
    """A tiny random model of the family, 2 layers, a 16-token window."""
    cls, options = SLIDING[family]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(vocab_size=128, num_hidden_layers=2, intermediate_size=128, sliding_window=16,
                                        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        **options)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_layers_prefill_and_decode_as_one_process(family, tmp_path):
    """A 40-token prompt over a 16-token window, blocks of 8 (a decode step's layer still holds tokens past
    its window): the prompt's logits and the greedy tokens are one process's."""
    model = _sliding_model(family)
    model.save_pretrained(tmp_path)
    method, ids = "fp16:block=8", _prompt(40, seed=4)
    ref, tokens = _single(model, method, ids, 6)
    res = launch(run_rank, 2, ({"folder": str(tmp_path)}, method, ids, 6, True), timeout=300)
    torch.testing.assert_close(torch.cat([r["logits"] for r in res]), ref, rtol=1e-4, atol=1e-4)
    assert all(r["tokens"] == tokens for r in res)
    m = prepare(model, method)
    cache = from_method(method, m)
    with torch.no_grad():  # each decode step's logits, the tokens fed one by one through one process's cache
        m(ids, **with_cache(m, cache))
        steps = [m(torch.tensor([[t]]), **with_cache(m, cache)).logits[0, -1] for t in tokens[:-1]]
    torch.testing.assert_close(res[0]["step_logits"], torch.stack(steps), rtol=1e-4, atol=1e-4)


def test_zdc_narrowed_exchange_on_a_sliding_model_gives_the_whole_exchanges_logits(tmp_path, monkeypatch):
    """Mistral (every layer sliding over 16 tokens), 100 tokens: narrowed queries and outputs meet the band as
    whole ones do."""
    model = _sliding_model("mistral")
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path / "calib"))
    calib_ids = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(1))
    zdc.calibrate(model, calib_ids, {"test": True}).save(zdc.default_calibration_path(model))
    source, method, ids = {"folder": str(tmp_path / "model")}, "zdc-adaptive-50", _prompt(100, seed=5)
    narrowed, whole = (launch(run_rank, 2, (source, method, ids, 3, True, "model", False, x), timeout=300)
                       for x in ("reduced", "kv"))
    for kind in ("logits", "step_logits"):
        torch.testing.assert_close(torch.cat([r[kind] for r in narrowed]), torch.cat([r[kind] for r in whole]),
                                   rtol=1e-4, atol=1e-4)
    assert all(n["sent"]["q"] <= w["sent"]["q"] and n["sent"]["o"] <= w["sent"]["o"] for n, w in zip(narrowed, whole))
    assert sum(n["sent"]["q"] + n["sent"]["o"] for n in narrowed) < sum(w["sent"]["q"] + w["sent"]["o"] for w in whole)


def test_zdc_queries_keys_values_and_outputs_cross_at_the_coordinates_their_cache_keeps(tiny):
    """FDC's exchange: keys and values at their heads' ranks; a query before the prompt's last window at its
    key rank plus its scores of the sink tokens; an output at its value rank plus its sink weights (the
    sink's keys and values go to every rank once per layer). The logits are those of the exchange that
    sends queries and outputs whole ("kv"), to float tolerance."""
    model, source = tiny
    method, world, n = "zdc-adaptive-50", 2, 200
    cache = from_method(method, prepare(model, method))
    ids = _prompt(n, seed=3)
    res = launch(run_rank, world, (source, method, ids, 2, True), timeout=300)
    sink, window, wide = cache.sink, cache.window, cache.ranks.sink_rank
    layers, group = cache.ranks.k.shape[0], model.config.num_attention_heads // model.config.num_key_value_heads
    assert n > sink + window  # some tokens cross narrowed
    sent = full = 0
    for r in res:
        s, e = r["token_range"]
        n_wide = sum(p < sink or p >= n - window for p in range(s, e))
        other = res[1 - r["rank"]]
        for kind, ranks in (("k", cache.ranks.k), ("v", cache.ranks.v)):
            want = sum(n_wide * wide + (e - s - n_wide) * int(ranks[layer, h])
                       for layer in range(layers) for h in range(*other["heads"]))
            assert r["sent"][kind] == want * FLOAT
        # queries of this rank's tokens to the other's heads; outputs of this rank's heads to the other's tokens
        for kind, ranks, tokens, heads in (("q", cache.ranks.k, (s, e), other["heads"]),
                                           ("o", cache.ranks.v, other["token_range"], r["heads"])):
            late = sum(p >= n - window for p in range(*tokens))
            early = tokens[1] - tokens[0] - late
            # a head whose rank plus the sink's numbers would not be fewer than wide sends whole rows
            want = sum(group * (early * (int(ranks[layer, h]) + sink) + late * wide
                                if int(ranks[layer, h]) + sink < wide else (early + late) * wide)
                       for layer in range(layers) for h in range(*heads))
            assert r["sent"][kind] == want * FLOAT
        assert r["sent"].get("sink", 0) == (2 * cache.ranks.k.shape[1] * sink * wide * FLOAT * layers
                                            if r["rank"] == 0 else 0)
        sent += sum(r["sent"].values())
        full += (e - s) * model.config.head_dim * 2 * (1 + group) * (other["heads"][1] - other["heads"][0]) * layers * FLOAT
    assert sent < 0.8 * full  # half the dimensions in the budget, all of them for the sink and window tokens
    whole = launch(run_rank, world, (source, method, ids, 2, True, "model", False, "kv"), timeout=300)
    torch.testing.assert_close(torch.cat([r["logits"] for r in res]), torch.cat([r["logits"] for r in whole]),
                               rtol=1e-4, atol=1e-4)
    assert [r["tokens"] for r in res] == [r["tokens"] for r in whole]
    assert all(w["sent"]["q"] > r["sent"]["q"] for r, w in zip(res, whole))


def test_a_failing_rank_stops_every_rank_with_one_line(tiny, monkeypatch):
    _, source = tiny
    monkeypatch.setenv(FAULT, "1")
    start = time.monotonic()
    with pytest.raises(KvshrinkError, match=r"^rank 1 of 2 failed: fault injected on rank 1"):
        launch(run_rank, 2, (source, "fp16", _prompt(16), 2), timeout=120)
    assert time.monotonic() - start < 100  # not the collective's timeout: the others were stopped


def test_cli_refuses_a_method_it_cannot_shard_in_one_line(capsys):
    assert main(["generate", "--prompt", "hi", "--nproc", "2", "--method", "kvc-8x", "--max-new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot be split by KV heads" in lines[0], lines


def test_a_narrowed_exchange_refuses_what_it_cannot_narrow(tiny):
    """Rank 0 shares the sink tokens: a prompt that leaves it fewer is refused, naming the exchange that works."""
    model, _ = tiny
    method = "zdc-adaptive-50"
    with pytest.raises(KvshrinkError, match=r"leaves rank 0 2 tokens, fewer than the 4 sink.*--exchange kv"):
        check(copy.deepcopy(model), None, method, 8, 1, 4)
    check(copy.deepcopy(model), None, method, 8, 1, 4, exchange="kv")
    check(copy.deepcopy(model), None, method, 16, 1, 4)


def _torchrun(args, env=None, timeout=240):
    """`torchrun --nproc-per-node 2 -m kvshrink generate ...` on loopback; (returncode, stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "kvshrink", "generate", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return out.returncode, out.stdout, out.stderr


def test_torchrun_ranks_generate_what_one_process_generates(bundled):
    """The same entry under torchrun (env:// rendezvous, rank 0 reports): fp16's greedy text equals one process's."""
    model, tok = bundled
    prompt, new = "The history of the river begins in the mountains, where", 5
    ids = tok(prompt, return_tensors="pt").input_ids
    _, tokens = _single(model, "fp16", ids, new)
    rc, out, err = _torchrun(["--prompt", prompt, "--raw", "--method", "fp16", "--max-new-tokens", str(new)])
    assert rc == 0, err
    text, report = out.split(f"\n[fp16] 2 processes, {ids.shape[1]} prompt tokens\n")
    assert text.rstrip("\n") == tok.decode(tokens, skip_special_tokens=True)
    assert report.count("rank ") == 2  # rank 0 prints both ranks' bytes and times, rank 1 nothing


def test_torchrun_names_the_rank_that_failed_first_and_stops():
    start = time.monotonic()
    rc, out, err = _torchrun(["--prompt", "one two three four", "--raw", "--method", "fp16", "--max-new-tokens", "2"],
                             env={FAULT: "1"})
    assert rc != 0 and out == ""
    ours = [x for x in err.splitlines() if x.startswith("kvshrink: error:")]
    assert f"kvshrink: error: rank 1 of 2 failed: fault injected on rank 1 ({FAULT})" in ours, err
    others = [x for x in ours if "rank 1 of 2" not in x]  # a bystander, if it speaks before it is stopped
    assert all(x.endswith(f"stopped: rank 1 failed: fault injected on rank 1 ({FAULT})") for x in others), err
    assert time.monotonic() - start < 200


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([8, 4]), n=st.integers(1, 300), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16),
       constant=st.booleans())
def test_wire_codes_round_trip_within_half_a_step_in_the_bytes_they_claim(bits, n, scale, seed, constant):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if constant:
        x[:] = x[0]
    wire = Wire(bits)
    data = wire.encode(x)
    assert data.dtype == torch.uint8 and data.numel() == wire.nbytes(n, 4)
    groups = -(-n // GROUP)
    assert data.numel() == groups * (GROUP * bits // 8 + 4)  # the codes, a float16 step and minimum per group
    y = wire.decode(data, n)
    steps = data[groups * GROUP * bits // 8:][:2 * groups].clone().view(torch.float16).float()
    err = torch.zeros(groups * GROUP)
    err[:n] = y - x
    # within half a step per rotated coordinate: sqrt(GROUP) half-steps in L2 per group (the rotation is orthonormal)
    assert torch.all(err.view(groups, GROUP).norm(dim=1) <= GROUP ** 0.5 * steps / 2 * (1 + 1e-3) + 1e-6)
    # a step is at most the rotated group's range over 2^bits - 1, and that range at most twice its norm
    padded = torch.cat([x, x[-1:].expand(groups * GROUP - n)]).view(groups, GROUP)
    qmax = 2 ** bits - 1
    assert torch.all(err.view(groups, GROUP).norm(dim=1) <= GROUP ** 0.5 * padded.norm(dim=1) / qmax * 1.01 + 1e-6)


def test_wire_refuses_non_finite_states_and_unknown_formats():
    x = torch.ones(70)
    x[5] = float("nan")
    with pytest.raises(KvshrinkError, match="NaN or infinite"):
        Wire(8).encode(x)
    with pytest.raises(KvshrinkError, match="unknown wire format 'int3'"):
        wire_from_name("int3")
    assert Wire(None).nbytes(100, 4) == 400


def test_an_int8_wire_sends_the_coded_size_and_stays_close(bundled):
    """fp16 on 2 ranks, int-coded prefill messages: each kind's bytes are the coded size of the float32
    message each layer sends the other rank, and the prompt logits stay within the codes' error."""
    model, _ = bundled
    ids = _prompt(40, vocab=20000, seed=4)
    ref, _ = _single(model, "fp16", ids, 1)
    res = launch(run_rank, 2, (None, "fp16", ids, 1, True, "int8"), timeout=300)
    layers, d, wire = model.config.num_hidden_layers, model.config.head_dim, Wire(8)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for r, other in zip(res, reversed(res)):
        (s, e), (a, b), (so, eo) = r["token_range"], other["heads"], other["token_range"]
        mine = r["heads"][1] - r["heads"][0]
        elements = {"k": (e - s) * (b - a) * d, "v": (e - s) * (b - a) * d, "q": (e - s) * (b - a) * group * d,
                    "o": (eo - so) * mine * group * d}  # its heads' outputs for the other rank's tokens
        for kind, n in elements.items():
            assert r["sent"][kind] == layers * wire.nbytes(n, FLOAT) < layers * n * FLOAT / 3.7
    got = torch.cat([r["logits"] for r in res])
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert 0 < kl.max() < 0.05  # lossy, but by little


def test_wire_without_several_processes_is_refused_in_one_line(capsys):
    assert main(["generate", "--prompt", "hi", "--wire", "int8", "--max-new-tokens", "1"]) == 2
    assert main(["generate", "--prompt", "hi", "--nproc", "2", "--wire", "int3"]) == 2
    assert main(["generate", "--prompt", "hi", "--nproc", "0"]) == 2  # refused before a split over no ranks
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "--wire applies to runs on several processes" in lines[0]
    assert "int3" in lines[1] and "int8" in lines[1]
    assert "--nproc must be at least 1, got 0" in lines[2]


def test_zdc_with_keys_and_values_exchanged_in_full_gives_the_single_process_output(tiny):
    """exchange="full": the receiving rank attends to the prompt at full width and stores it reduced, as one
    process's single call does (the reduced exchange cannot: its prompt tokens meet each other reduced)."""
    model, source = tiny
    method, ids = "zdc-adaptive-50", _prompt(120, seed=6)
    ref, tokens = _single(model, method, ids, 4)
    res = launch(run_rank, 2, (source, method, ids, 4, True, "model", False, "full"), timeout=300)
    torch.testing.assert_close(torch.cat([r["logits"] for r in res]), ref, rtol=1e-3, atol=1e-3)
    assert all(r["tokens"] == tokens for r in res)
    layers, d = model.config.num_hidden_layers, model.config.head_dim
    for r, other in zip(res, reversed(res)):
        s, e = r["token_range"]
        assert r["sent"]["k"] == r["sent"]["v"] == (e - s) * (other["heads"][1] - other["heads"][0]) * d * FLOAT * layers
