"""kvshrink serve: a real server on a loopback port, talked to with the `openai` client and httpx."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from kvshrink import from_method
from kvshrink.cli import main
from kvshrink.compat import with_cache
from kvshrink.errors import KvshrinkError
from kvshrink.serve.engine import Engine, Request, Sampling
from kvshrink.serve.ragged import RaggedCache, Segment
from kvshrink.serve.server import build, parse_bytes
from kvshrink.spec import spec_from_config

pytestmark = pytest.mark.model

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Name three colors.",
           "Explain gravity in one sentence.", "Tell me a story about a cat.", "What is 2 + 2?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`build` + uvicorn in a thread on a free loopback port, for the length of a `with`."""

    def __init__(self, loaded, method, budget=256 * 10**6, **kw):
        self.app, self.engine, self.metrics = build(None, method, budget, probe=256, decode_steps=0,
                                                    log=lambda *_: None,
                                                    loaded=loaded, **kw)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def chat(self, prompt, **kw):
        kw.setdefault("max_tokens", 16)
        kw.setdefault("temperature", 0)
        return self.client.chat.completions.create(model="smollm2-135m",
                                                   messages=[{"role": "user", "content": prompt}], **kw)

    def metric(self, name):
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def reference(model, tok, method, prompt, max_new):
    """What model.generate gives alone, greedy, with the method's own cache."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, **with_cache(model, from_method(method, model)))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_and_completions_with_the_openai_client(bundled):
    with Server(bundled, "int4") as s:
        assert [m.id for m in s.client.models.list().data] == ["smollm2-135m"]
        r = s.chat(PROMPTS[0])
        assert r.choices[0].message.content == reference(*bundled, "int4", PROMPTS[0], 16)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10
        parts, finish = [], None
        for chunk in s.chat(PROMPTS[0], stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(parts) == r.choices[0].message.content and finish == r.choices[0].finish_reason
        c = s.client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8,
                                        temperature=0, stop=["\n"])
        assert "Paris" in c.choices[0].text and "\n" not in c.choices[0].text
        streamed = "".join(ch.choices[0].text for ch in s.client.completions.create(
            model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0, stop=["\n"],
            stream=True) if ch.choices)
        assert streamed == c.choices[0].text
        # a stop string ends the text before it; a seed repeats a sampled answer, another seed need not
        r = s.chat(PROMPTS[4], stop=["."], max_tokens=40)
        assert "." not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        a, b = (s.chat(PROMPTS[4], temperature=1.0, top_p=0.9, seed=7, max_tokens=8).choices[0].message.content
                for _ in range(2))
        others = {s.chat(PROMPTS[4], temperature=1.0, seed=k, max_tokens=8).choices[0].message.content
                  for k in range(3)}
        assert a == b and len(others) > 1


@pytest.mark.parametrize("method", ["fp16", "int4"])
def test_concurrent_requests_get_what_each_gets_alone(bundled, method):
    with Server(bundled, method) as s:
        alone = [s.chat(p, max_tokens=8).choices[0].message.content for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: s.chat(p, max_tokens=8).choices[0].message.content, PROMPTS))
        assert together == alone
        assert s.engine.peak_running >= 3  # they really shared forward calls
        assert s.metric("kvshrink_requests_total") == 2 * len(PROMPTS)


def test_bad_requests_get_400_and_the_server_keeps_serving(bundled):
    with Server(bundled, "int4") as s:
        cases = [({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
                 ({"prompt": "hi", "model": "gpt-4"}, "unknown model"),
                 ({"prompt": "hi", "n": 2}, "n=2"),
                 ({"prompt": "hi", "temperature": 5}, "temperature"),
                 ({"prompt": "word " * 9000, "max_tokens": 4}, "longer than the model allows"),
                 ({"max_tokens": 4}, "prompt")]
        for body, words in cases:
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 400, body
            assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(s.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError):
            s.chat("hi", max_tokens=-1)
        assert s.chat("Say hi.", max_tokens=4).choices[0].message.content


def test_a_full_queue_answers_429(bundled):
    with Server(bundled, "int4", max_running=1, queue_limit=1) as s:
        def post(_):
            return httpx.post(s.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 20,
                                                               "temperature": 0}, timeout=120)
        with ThreadPoolExecutor(4) as pool:
            codes = [r.status_code for r in pool.map(post, range(4))]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert s.metric("kvshrink_requests_rejected_total") == codes.count(429)


def test_admission_by_measured_bytes(bundled):
    """A budget that holds two requests' measured need runs two at a time, and finishes all."""
    model, tok = bundled
    app, engine, _ = build(None, "int4", 10**9, probe=256, decode_steps=20, log=lambda *_: None, loaded=bundled)
    ids = tok("The history of the Roman Empire", add_special_tokens=False).input_ids
    need = engine.need.need(len(ids) + 20)
    assert need >= engine.need.per_token() * (len(ids) + 20) * 0.9  # counted at the real rate, not assumed
    engine.kv_budget = 2 * need + need // 2
    done = []
    for i in range(5):
        engine.submit(Request(ids, Sampling(max_tokens=20, temperature=0), lambda k, p: done.append(k) if k != "text" else None))
    while len(done) < 5:
        engine.step()
        assert len(engine.running) <= 2 and engine.reserved() <= engine.kv_budget
        assert engine.held <= engine.kv_budget
    assert done == ["done"] * 5 and engine.peak_running == 2
    with pytest.raises(Exception, match="more than the whole KV budget"):
        engine.submit(Request(ids, Sampling(max_tokens=2000), lambda k, p: None))


def test_a_step_with_a_non_finite_state_leaves_every_sequence_as_it_was(bundled):
    """A step's packed states are checked once per layer, before any sequence's cache takes its slice: a NaN
    in one sequence's keys is refused in one line, and no cache holds a token of that step."""
    model, _ = bundled
    spec = spec_from_config(model.config)
    shape = (1, spec.num_kv_heads, 200, spec.head_dim)
    g = torch.Generator().manual_seed(0)
    caches = [from_method("int4", model) for _ in range(2)]
    RaggedCache([Segment(caches[0], 0, 130), Segment(caches[1], 130, 70)]).update(
        torch.randn(shape, generator=g), torch.randn(shape, generator=g), 0)
    assert [c.layers[0].held() for c in caches] == [130, 70]
    k, v = torch.randn(*shape[:2], 2, shape[3], generator=g), torch.randn(*shape[:2], 2, shape[3], generator=g)
    k[0, 1, 1, 5] = float("nan")  # the second sequence's token
    with pytest.raises(KvshrinkError, match="NaN"):
        RaggedCache([Segment(caches[0], 0, 1), Segment(caches[1], 1, 1)]).update(k, v, 0)
    assert [c.layers[0].held() for c in caches] == [130, 70]
    k[0, 1, 1, 5] = 0.0
    RaggedCache([Segment(caches[0], 0, 1), Segment(caches[1], 1, 1)]).update(k, v, 0)
    assert [c.layers[0].held() for c in caches] == [131, 71]


def test_long_prompts_decode_together_in_one_kernel_call_as_alone(bundled, monkeypatch):
    """Prompts longer than a cache block: the decode tokens of every running sequence are read by one
    kernel call per layer (SplitStates.attend_many), and each request still gets what it gets alone."""
    from kvshrink.attention.split import SplitStates
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 5_000)
    prompts = [ids[at:at + n].tolist() for at, n in ((0, 140), (600, 200), (1500, 260))]
    _, fresh = make_engine(model, tok, "int4", 10**9, probe=256, decode_steps=0, log=lambda *_: None)
    calls = []
    many = SplitStates.attend_many
    monkeypatch.setattr(SplitStates, "attend_many", staticmethod(lambda st, *a: calls.append(len(st)) or many(st, *a)))

    def run(ps):
        eng = fresh()
        reqs = [eng.submit(Request(p, Sampling(max_tokens=8, temperature=0, ignore_eos=True), lambda k, q: None))
                for p in ps]
        while any(r.finish is None for r in reqs):
            eng.step()
        return [r.out for r in reqs]

    alone = [run([p])[0] for p in prompts]
    calls.clear()
    assert run(prompts) == alone
    assert max(calls) == 3  # all three sequences' decode tokens in one call


class _Underestimate:
    """A byte model that believes every request is nearly free: admission lets too many in."""

    def need(self, n):
        return 1


def test_preempted_requests_are_parked_and_resumed_without_recomputing(bundled):
    """When a need falls short and the caches outgrow the budget, the newest request is preempted:
    parked on disk and resumed where it stopped (no token run twice), or with park=False freed and
    recomputed. Either way every request gets what it gets alone."""
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 5_000)
    prompts = [ids[at:at + n].tolist() for at, n in ((0, 70), (600, 90), (1500, 110))]
    _, fresh = make_engine(model, tok, "int4", 10**9, probe=256, decode_steps=0, log=lambda *_: None)

    def run(eng, ps):
        reqs = [eng.submit(Request(p, Sampling(max_tokens=10, temperature=0, ignore_eos=True), lambda k, q: None))
                for p in ps]
        parked = 0
        while any(r.finish is None for r in reqs):
            eng.step()
            parked = max(parked, eng.parking.nbytes())
            assert eng.held <= eng.kv_budget or len(eng.running) == 1
        return [r.out for r in reqs], parked

    alone = [run(fresh(), [p])[0][0] for p in prompts]
    fed_once = sum(len(p) + 10 - 1 for p in prompts)
    for park in (True, False):
        eng = fresh()
        eng.park = park
        eng.kv_budget = eng.need.need(110 + 10) * 2  # two of the three
        eng.need = _Underestimate()
        outs, parked = run(eng, prompts)
        assert outs == alone, park
        assert eng.preemptions >= 1
        if park:
            assert eng.tokens_fed == fed_once and parked > 0  # nothing recomputed
            assert eng.parking.nbytes() == 0 and os.listdir(eng.parking.folder) == []  # read back, files removed
        else:
            assert eng.tokens_fed > fed_once and parked == 0
        eng.parking.close()


def _run(eng, prompts, max_tokens=10):
    reqs = [eng.submit(Request(p, Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True), lambda k, q: None))
            for p in prompts]
    while any(r.finish is None for r in reqs):
        eng.step()
    return [r.out for r in reqs]


@pytest.mark.parametrize("method", ["int4", "fp16"])
def test_a_shared_prompt_chunk_is_reused_and_gives_what_a_cold_start_gives(bundled, method):
    """A prompt's cache after each whole chunk is kept: a later prompt that starts with those tokens
    feeds only the rest, and, the kept cache being what a cold prefill builds, gets the same tokens."""
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 5_000).tolist()
    first, second = ids[:300], ids[:256] + ids[2000:2090]  # 256: one whole chunk in common
    _, cold = make_engine(model, tok, method, 10**9, step_tokens=128, probe=256, prefix=False, decode_steps=0,
                           log=lambda *_: None)
    _, warm = make_engine(model, tok, method, 10**9, step_tokens=128, probe=256, decode_steps=0, log=lambda *_: None)
    expected = _run(cold(), [second])[0]
    eng = warm()
    _run(eng, [first])
    assert {len(k) for k in eng.prefix.entries} == {128, 256, 300 + 10 - 1}  # two chunk ends and the finished one
    fed = eng.tokens_fed
    assert _run(eng, [second])[0] == expected
    assert eng.tokens_fed - fed == len(second) - 256 + 10 - 1  # the shared 256 tokens were not run again
    assert eng.prefix.hits == 1 and eng.prefix.reused_tokens == 256


def test_a_chats_second_turn_continues_from_its_first(bundled):
    """Through the openai client: the second turn's prompt (the first turn's history plus a new
    message) starts with the finished first turn's cache, whose bytes the running request shares."""
    with Server(bundled, "int4") as s:
        q1 = [{"role": "user", "content": "What is the capital of France?"}]
        a1 = s.client.chat.completions.create(model="smollm2-135m", messages=q1, max_tokens=12, temperature=0)
        history = len(s.engine.tok.apply_chat_template(q1, add_generation_prompt=True, return_dict=True)["input_ids"])
        q2 = q1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                   {"role": "user", "content": "And of Italy?"}]
        before = s.engine.tokens_fed
        a2 = s.client.chat.completions.create(model="smollm2-135m", messages=q2, max_tokens=12, temperature=0)
        reused = s.metric("kvshrink_prefix_reused_tokens")
        assert reused >= history + a1.usage.completion_tokens - 1  # the whole first turn
        assert s.engine.tokens_fed - before == a2.usage.prompt_tokens - reused + a2.usage.completion_tokens - 1
        assert a2.choices[0].message.content


def test_a_decoding_request_stays_within_its_reservation(bundled):
    """Decode tokens wait in float16 (up to `gather` of them) before they are staged, so a decoding
    cache holds more than a prompt-grown one of the same length: the measured need covers it (and the
    prompt-grown need alone would not). Blocks of 16 tokens: a full cycle is measured in 32 steps."""
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    _, fresh = make_engine(model, tok, "int4:block=16", 10**9, probe=256, log=lambda *_: None)  # a full cycle
    eng = fresh()
    ids = tok("The history of the Roman Empire begins with the founding of the city", add_special_tokens=False).input_ids
    req = eng.submit(Request(ids, Sampling(max_tokens=24, temperature=0, ignore_eos=True), lambda k, q: None))
    over = 0  # the most held above a prompt-grown cache of the same length
    while req.finish is None:
        eng.step()
        if req.cache is not None:
            n, held = req.cache.get_seq_length(), req.cache.nbytes()
            assert held <= eng.need.need(n)
            over = max(over, held - eng.need.prompt_need(n))
    assert over > 0


def test_a_fork_keeps_sharing_its_entrys_blocks_as_it_grows(bundled):
    """While a request runs on a kept cache, their common storage is counted once, and stays common
    after the request has coded blocks of its own (copy-on-write by block: prefix.py)."""
    from kvshrink.codecs.base import tensor_nbytes
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 5_000).tolist()
    _, fresh = make_engine(model, tok, "int4:block=32", 10**9, probe=256, decode_steps=0, log=lambda *_: None)
    eng = fresh()
    first = _run(eng, [ids[:300]])[0]
    entry = next(e for e in eng.prefix.entries.values() if e.finished)
    req = eng.submit(Request(ids[:300] + first + [13, 14], Sampling(max_tokens=200, temperature=0, ignore_eos=True),
                             lambda k, q: None))
    while len(req.out) < 40:  # past a whole block (32 tokens) of its own
        eng.step()
    shared = entry.cache.shareable_nbytes()
    own = [t for t in req.cache.payload()]
    apart = tensor_nbytes(entry.cache.payload()) + tensor_nbytes(own)
    together = tensor_nbytes(entry.cache.payload() + own)
    assert shared > 0.5 * tensor_nbytes(entry.cache.payload())  # the entry is mostly coded blocks
    assert together <= apart - shared  # all of them still held once
    eng.measure()
    everything = [t for e in eng.prefix.entries.values() for t in e.cache.payload()] + own
    assert eng.held == tensor_nbytes(everything)


def test_requests_that_share_a_system_prompt_are_admitted_for_their_own_bytes(bundled):
    """Four requests that start with one 512-token prompt, under a budget that holds three
    caches of their length: the blocks they share are the prefix entry's bytes, so all four run at
    once (other entries dropped for room), and each gets what a cold start gives it alone."""
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.server import make_engine

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 5_000).tolist()
    system = ids[:512]
    prompts = [system + ids[3000 + 8 * i:3008 + 8 * i] for i in range(5)]
    _, cold = make_engine(model, tok, "int4", 10**9, step_tokens=128, probe=512, prefix=False, decode_steps=0,
                           log=lambda *_: None)
    alone = [_run(cold(), [p], max_tokens=8)[0] for p in prompts[1:]]
    _, warm = make_engine(model, tok, "int4", 10**9, step_tokens=128, probe=512, decode_steps=8, log=lambda *_: None)
    eng = warm()
    eng.kv_budget = int(3 * eng.need.need(520 + 8))
    _run(eng, prompts[:1], max_tokens=8)  # keeps the prompt's chunk ends (128 ... 512 tokens) and itself
    eng.peak_running = 0
    assert _run(eng, prompts[1:], max_tokens=8) == alone
    assert eng.peak_running == 4 and eng.prefix.hits == 4 and eng.preemptions == 0


def test_a_client_that_disconnects_frees_its_cache(bundled):
    with Server(bundled, "int4") as s:
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert s.metric("kvshrink_requests_running") == 1 and s.metric("kvshrink_kv_bytes_held") > 0
        deadline = time.time() + 10
        while s.metric('kvshrink_requests_total{reason="abort"}') < 1:
            assert time.time() < deadline, "the aborted request was not freed"
            time.sleep(0.1)
        assert s.metric("kvshrink_requests_running") == 0 and s.metric("kvshrink_kv_bytes_held") == 0


def test_parse_bytes_and_cli_refusals(capsys):
    assert parse_bytes("256MB") == 256 * 10**6 and parse_bytes("1GiB") == 2**30 and parse_bytes("1000") == 1000
    for bad in ("lots", "-5MB", "0"):
        with pytest.raises(Exception, match="KV budget"):
            parse_bytes(bad)
    assert main(["serve", "--method", "int9"]) == 2
    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--probe-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("kvshrink: error:") for line in err) and "--probe-tokens 0" in err[2]


def test_sigterm_finishes_running_requests_then_exits():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvshrink.cli", "serve", "--port", str(port), "--method", "int4",
                             "--decode-probe", "0", "--probe-tokens", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.5)
        body = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_bench_section_holds_more_compressed_sequences(bundled):
    """The serve bench's section on a small workload: every request completes, and under the same
    budget int4 runs more sequences at once than fp16, as their measured bytes say it should."""
    from kvshrink.corpus import load_corpus_ids
    from kvshrink.serve.load import Workload, serve_section, serve_table

    model, tok = bundled
    ids = load_corpus_ids(tok, None, 20_000)
    work = Workload(requests=6, prompt_median=100, prompt_range=(60, 160), output_median=6, output_range=(4, 8))
    res = serve_section(model, tok, ["fp16", "int4"], ids, 4 * 10**6, rates=(float("inf"),), workload=work,
                        log=lambda *_: None, decode_steps=8, probe=256)
    fp16, int4 = (res["by_method"][m] for m in ("fp16", "int4"))
    for m in (fp16, int4):
        run = m["runs"][0]
        assert run["completed"] == 6 and run["output_tok_s"] > 0 and run["ttft_p50_s"] <= run["ttft_p99_s"]
    assert res["probe_tokens"] == 256 and fp16["bytes_per_token"] / int4["bytes_per_token"] > 3
    assert int4["runs"][0]["peak_running"] > fp16["runs"][0]["peak_running"]
    assert "`int4`" in serve_table(res) and "bytes/token @256" in serve_table(res)


def test_bench_refuses_a_bad_serve_budget(capsys):
    assert main(["bench", "--sections", "serve", "--serve-budget", "lots"]) == 2
    assert "KV budget" in capsys.readouterr().err


class _Ids:
    """A tokenizer for random models: ids as text."""

    eos_token_id = None

    def __len__(self):
        return 128

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_sliding_window_models_batch_as_they_run_alone(arch, monkeypatch):
    """Sliding-window layers (Gemma 3's mix, Gemma 2's soft-capped ones) in the packed batch: prompts
    longer than the window, prefilled in chunks, give the tokens that the model's own masks give
    over the same chunks, alone and together."""
    import transformers as T

    from kvshrink.serve.server import make_engine

    window, chunk, new = 24, 32, 8
    layers = {"gemma3": dict(layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
              "gemma2": dict(attn_logit_softcapping=20.0, query_pre_attn_scalar=64)}[arch]
    cls = T.Gemma3TextConfig if arch == "gemma3" else T.Gemma2Config
    config = cls(vocab_size=128, num_hidden_layers=3, intermediate_size=64, max_position_embeddings=1024,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=64, sliding_window=window, **layers)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 70, 90)]

    def own_masks(prompt):  # the model's forward with its own sliding masks, chunk by chunk, then greedy
        cache = from_method("fp16", model)
        ids = list(prompt)
        with torch.no_grad():
            for at in range(0, len(ids), chunk):
                logits = model(input_ids=torch.tensor([ids[at:at + chunk]]), **with_cache(model, cache),
                               use_cache=True).logits
            for _ in range(new):
                ids.append(int(logits[0, -1].argmax()))
                logits = model(input_ids=torch.tensor([ids[-1:]]), **with_cache(model, cache), use_cache=True).logits
        return ids[len(prompt):]

    monkeypatch.setenv("KVSHRINK_CORPUS", "/nonexistent")  # no corpus for this vocabulary: bytes on random ids
    model, fresh = make_engine(model, _Ids(), "fp16", 10**9, step_tokens=chunk, probe=64, decode_steps=0,
                                 log=lambda *_: None)

    def engine(ps):
        eng = fresh()
        reqs = [eng.submit(Request(p, Sampling(max_tokens=new, temperature=0, ignore_eos=True), lambda k, q: None))
                for p in ps]
        while any(r.finish is None for r in reqs):
            eng.step()
        return [r.out for r in reqs]

    expected = [own_masks(p) for p in prompts]
    assert [engine([p])[0] for p in prompts] == expected
    assert engine(prompts) == expected
