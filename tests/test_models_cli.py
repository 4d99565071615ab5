"""Model loading, architecture checks, and every bad input the CLI must answer in one line."""

import subprocess
import sys

import pytest
import torch

from kvshrink import KvshrinkError, load_model
from kvshrink.cli import main
from kvshrink.corpus import default_corpus
from kvshrink.spec import spec_from_config


def test_spec_of_a_llama_config(tiny_config):
    spec = spec_from_config(tiny_config)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context) == (2, 4, 2, 16, 512)


def _unsupported_configs():
    from transformers import DeepseekV3Config, Llama4TextConfig, MambaConfig, Qwen3NextConfig, T5Config

    return {
        "mamba": (MambaConfig(), "state-space"),
        "encoder-decoder": (T5Config(), "encoder-decoder"),
        "mla": (DeepseekV3Config(), "latent attention"),
        "linear-hybrid": (Qwen3NextConfig(), "linear-attention"),
        "chunked": (Llama4TextConfig(), "chunked attention"),
    }


@pytest.mark.parametrize("kind", ["mamba", "encoder-decoder", "mla", "linear-hybrid", "chunked"])
def test_unsupported_architectures_are_refused_by_name(kind):
    config, why = _unsupported_configs()[kind]
    with pytest.raises(KvshrinkError, match=f"unsupported architecture '{config.model_type}': .*{why}"):
        spec_from_config(config)


def test_sliding_and_hybrid_layers_are_described():
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    mistral = spec_from_config(MistralConfig(sliding_window=64, num_hidden_layers=2))
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.sliding_window == 64
    gemma3 = spec_from_config(Gemma3TextConfig(num_hidden_layers=7, sliding_window=512))
    assert [gemma3.is_sliding(i) for i in range(7)] == [True] * 5 + [False, True]
    gemma2 = spec_from_config(Gemma2Config(num_hidden_layers=2))
    assert gemma2.softcap == 50.0 and gemma2.is_sliding(0) and not gemma2.is_sliding(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model):
    """A tiny local model folder (random weights + a word-level tokenizer), 64-token context."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)
    cfg = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(tiny_model.state_dict())
    model.save_pretrained(folder)
    return str(folder)


def test_load_local_folder(tiny_folder):
    model, tok = load_model(tiny_folder)
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--methods", "int4,nope"], "unknown method 'nope'"),
    (["generate", "--prompt", "hi", "--method", "zip"], "unknown method 'zip'"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "unknown model '/no/such/model'"),
    (["bench", "--model", "./missing-folder", "--methods", "int4"], "unknown model"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--speed-contexts", "1k"], "integers"),
    (["bench", "--methods", "int4", "--device", "tpu"], "unknown device 'tpu'"),
    (["bench", "--methods", "int4", "--device", "mps"], "unsupported device 'mps'"),
    (["generate", "--prompt", "hi", "--device", "gpu0"], "unknown device 'gpu0'"),
    (["bench", "--methods", "int4", "--sections", "serve", "--device", "cuda"],
     "no CUDA device" if not torch.cuda.is_available() else "serve section runs on the CPU only"),
    *([] if torch.cuda.is_available() else
      [(["generate", "--prompt", "hi", "--device", "cuda:0"], "this machine has no CUDA device")]),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    code, err = _run(argv, capsys)
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unsupported_architecture_via_cli(tmp_path, capsys):
    from transformers import MambaConfig

    MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=32).save_pretrained(tmp_path)
    code, err = _run(["generate", "--prompt", "x", "--model", str(tmp_path)], capsys)
    assert code == 2 and "unsupported architecture 'mamba'" in err and len(err.splitlines()) == 1


def test_context_longer_than_model_allows(tiny_folder, capsys):
    code, err = _run(["generate", "--prompt", "w1 w2 w3", "--model", tiny_folder, "--max-new-tokens", "100", "--raw"], capsys)
    assert code == 2 and "longer than the model allows (64)" in err
    code, err = _run(["bench", "--model", tiny_folder, "--methods", "int4", "--sections", "quality",
                      "--seg-len", "128", "--segments", "1"], capsys)
    assert code == 2 and "longer than the model allows (64)" in err


def test_empty_and_short_corpus(tiny_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = ["bench", "--model", tiny_folder, "--methods", "int4", "--sections", "quality", "--seg-len", "32",
            "--segments", "1", "--speed-contexts", "16", "--needle-lengths", "32", "--out", str(tmp_path / "o")]
    code, err = _run(args + ["--corpus", str(empty)], capsys)
    assert code == 2 and "is empty" in err
    code, err = _run(args + ["--corpus", str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "does not exist" in err
    code, err = _run(args + ["--corpus", str(tmp_path)], capsys)  # a folder
    assert code == 2 and "is not a regular file" in err
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    code, err = _run(args + ["--corpus", str(short)], capsys)
    assert code == 2 and "fewer than one segment" in err


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_generate_prints_text_and_memory(tiny_folder, capsys, device):
    code = main(["generate", "--prompt", "w1 w2 w3 w4", "--model", tiny_folder, "--max-new-tokens", "20",
                 "--method", "int4", "--raw", "--device", device])
    out = capsys.readouterr().out
    assert code == 0 and "[int4] cache holds" in out and "fp16 cache" in out


def test_cli_entry_point_exit_code():
    proc = subprocess.run([sys.executable, "-m", "kvshrink.cli", "bench", "--methods", "int9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "int9" in proc.stderr


def test_calibrate_then_bench_zdc_end_to_end(tiny_folder, tmp_path, capsys, monkeypatch):
    import json

    torch.manual_seed(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 125, (600,))))
    calib = tmp_path / "zdc.safetensors"
    code = main(["calibrate", "--method", "zdc", "--model", tiny_folder, "--corpus", str(corpus),
                 "--sequences", "2", "--length", "32", "--out", str(calib)])
    assert code == 0 and calib.exists() and "energy kept by half" in capsys.readouterr().out
    monkeypatch.setenv("KVSHRINK_ZDC_CALIBRATION", str(calib))
    out = tmp_path / "o"
    code = main(["bench", "--model", tiny_folder, "--corpus", str(corpus), "--methods", "zdc-adaptive-50:window=8,zdc-50+int4",
                 "--sections", "quality", "--seg-len", "48", "--segments", "2", "--chunk", "8", "--out", str(out)])
    assert code == 0
    q = json.loads((out / "results.json").read_text())["quality"]
    a, b = q["zdc-adaptive-50:window=8"], q["zdc-50+int4"]
    assert 1.3 < a["ratio"] < 2 and b["ratio"] > a["ratio"]
    # a calibration file that is not one: one line, exit 2
    capsys.readouterr()  # what the good run printed (a kernel's first-use notice on stderr)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("nope")
    monkeypatch.setenv("KVSHRINK_ZDC_CALIBRATION", str(bad))
    code, err = _run(["bench", "--model", tiny_folder, "--corpus", str(corpus), "--methods", "zdc-50",
                      "--sections", "quality", "--seg-len", "48", "--segments", "1", "--out", str(out)], capsys)
    assert code == 2 and "not a safetensors file" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method", ["rvq-d4", "zdc-50", "int4", "kvc-8x", "kvcomp-eb0.1"])
def test_an_unsupported_model_is_refused_before_any_method_looks_at_it(method):
    """Not "no RVQ codebooks" or "needs a ZDC-transformed model": the model's own reason first."""
    from types import SimpleNamespace

    from kvshrink import from_method, prepare

    config, why = _unsupported_configs()["mla"]
    with pytest.raises(KvshrinkError, match=f"unsupported architecture .*{why}"):
        prepare(SimpleNamespace(config=config), method)
    with pytest.raises(KvshrinkError, match=f"unsupported architecture .*{why}"):
        from_method(method, config)


def test_a_gguf_file_or_a_folder_holding_one_loads_as_the_bundled_model_does(tmp_path):
    """`--model path.gguf` and `--model folder/` (no config.json) read the GGUF's config; a folder
    with several GGUF files is refused naming them; a missing file in one line."""
    import glob
    import os

    from kvshrink.models import bundled_model_dir, load_config

    folder = bundled_model_dir()
    (gguf,) = glob.glob(os.path.join(folder, "*.gguf"))
    for source in (gguf, folder):
        config = load_config(source)
        assert spec_from_config(config) == spec_from_config(load_config(None))
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(KvshrinkError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\)"):
        load_config(str(tmp_path))
    with pytest.raises(KvshrinkError, match="no such GGUF file"):
        load_config(str(tmp_path / "missing.gguf"))


def test_a_gguf_model_loads_from_its_converted_folder_as_from_the_gguf_file(bundled, tmp_path, monkeypatch, capfd):
    """The bundled model comes from a folder converted once from its GGUF file: the same weights, config,
    tokenizer and logits as reading the GGUF file itself, which happens (said on stderr) when the
    conversion cannot be kept."""
    import glob
    import os

    from kvshrink.models import bundled_model_dir, converted_path

    model, tok = bundled
    (gguf,) = glob.glob(os.path.join(bundled_model_dir(), "*.gguf"))
    assert os.path.isdir(converted_path(*os.path.split(gguf)))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("KVSHRINK_MODEL_CACHE", str(tmp_path / "a-file" / "models"))  # cannot be made
    direct, direct_tok = load_model(gguf)
    assert "cannot keep a converted model" in capfd.readouterr().err
    want, got = direct.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    a, b = direct.config.to_dict(), model.config.to_dict()
    a.pop("quantization_config")
    assert a == b
    with open(default_corpus()) as f:
        text = f.read(20000)
    assert direct_tok(text).input_ids == tok(text).input_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert direct_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([tok(text).input_ids[:64]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)


def test_bench_refuses_to_calibrate_on_the_tokens_it_evaluates(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KVSHRINK_AUTO_CALIBRATION", raising=False)
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path / "calib"))
    corpus = tmp_path / "words.txt"  # 5,000 tokens: the calibration takes the last 2,048
    corpus.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 125, (5000,))))
    args = ["bench", "--model", tiny_folder, "--corpus", str(corpus), "--methods", "auto-4x", "--sections", "quality",
            "--seg-len", "48", "--out", str(tmp_path / "o")]
    code, err = _run(args + ["--segments", "70"], capsys)  # 3,360 evaluated tokens reach past token 2,952
    assert code == 2 and "would reuse 408 of the 3360 tokens being evaluated" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "calib").glob("auto-*"))  # refused before measuring anything


def test_calibrate_auto_then_bench_meets_the_ratio(tiny_folder, tmp_path, capsys, monkeypatch):
    import json

    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 125, (3000,))))
    calib = tmp_path / "auto.safetensors"
    code = main(["calibrate", "--method", "auto", "--model", tiny_folder, "--corpus", str(corpus), "--sequences", "1",
                 "--length", "36", "--block", "32", "--out", str(calib)])
    printed = capsys.readouterr().out
    assert code == 0 and calib.exists() and "auto calibration: 36 tokens" in printed
    tables = tmp_path / "auto-joint7-coded2.safetensors"  # entropy=true's code tables, beside the joint calibration
    assert tables.exists() and "key code tables: " in printed and str(tables) in printed
    vectors = tmp_path / "auto-vq1.safetensors"  # vector=true's codebooks and losses, beside the budget calibration
    assert vectors.exists() and "vector value calibration: " in printed and str(vectors) in printed
    shares = tmp_path / "auto-heads1.safetensors"  # heads=N's shares of each KV head, beside the budget calibration
    assert shares.exists() and "head share calibration: " in printed and str(shares) in printed
    monkeypatch.setenv("KVSHRINK_AUTO_CALIBRATION", str(calib))
    out = tmp_path / "o"
    code = main(["bench", "--model", tiny_folder, "--corpus", str(corpus), "--methods", "auto:budget=3:block=32:context=48",
                 "--sections", "quality", "--seg-len", "48", "--segments", "2", "--chunk", "16", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quality"]["auto:budget=3:block=32:context=48"]["ratio"] >= 3.0
    assert "bits per layer for keys" in res["methods"]["auto:budget=3:block=32:context=48"]["cache"]


def test_first_use_of_a_per_head_budget_measures_the_head_shares_beside_its_calibration(tiny_folder, tmp_path,
                                                                                         monkeypatch):
    """What `make bench` does on a fresh machine for `auto-6x` (heads=8): prepare() with a tokenizer measures the budget
    calibration, then each KV head's share, into the calibration folder, and the cache names the file it read."""
    import copy
    import glob

    from kvshrink import from_method, prepare

    monkeypatch.delenv("KVSHRINK_AUTO_CALIBRATION", raising=False)
    monkeypatch.setenv("KVSHRINK_CALIB_DIR", str(tmp_path / "calib"))
    corpus = tmp_path / "words.txt"
    words = torch.randint(0, 125, (5000,), generator=torch.Generator().manual_seed(0))
    corpus.write_text(" ".join(f"w{int(i)}" for i in words))
    model, tok = load_model(tiny_folder)
    name = "auto:budget=3:block=32:context=48:heads=1"
    model = prepare(copy.deepcopy(model), name, tok, str(corpus))
    shares = glob.glob(str(tmp_path / "calib" / "auto-*-heads1.safetensors"))
    assert len(shares) == 1
    cache = from_method(name, model)
    assert f"allocated per KV head by the shares in {shares[0]}" in cache.describe()
