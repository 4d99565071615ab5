"""Saving and resuming the store-based caches (core/saved.py): the int, budget, ZDC and RVQ methods. The round trip
of every method is in tests/test_matrix.py; here, what a file must refuse and what the CLI does with it."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvshrink import CompressedCache, IntQuant, KvshrinkError, from_method, load_cache, prepare, saved_method
from kvshrink.codecs.joint import JointKeys
from kvshrink.core import saved


def _ids(n, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def int_model(tiny_model):
    return prepare(copy.deepcopy(tiny_model), "int4")


def _saved(model, tmp_path, method="int4", n=150, **options):
    cache = from_method(method, model, **options)
    ids = _ids(n)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    path = str(tmp_path / "chat.safetensors")
    size = cache.save(path, ids=ids)
    return cache, path, size


def _rewrite(path, out, change):
    """The file at `path` with its metadata changed by `change(meta)`, written to `out`."""
    with safe_open(path, "pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    change(meta)
    save_file(tensors, out, metadata=meta)


def test_options_given_as_arguments_are_saved_and_rebuilt(int_model, tmp_path):
    cache, path, size = _saved(int_model, tmp_path, window=8, block=32)
    assert saved_method(path) == "int4"
    loaded = load_cache(path, int_model)
    assert loaded.describe() == cache.describe() and "window 8" in cache.describe()
    assert loaded.nbytes() == cache.nbytes()
    # the file is the payload and a header: no codec tables, no second copy of anything
    assert size < cache.nbytes() + 16384


def _other_codec(layers):
    layers[1]["stores"][0]["codec"] = "int2 per-channel"


def _other_calibration(layers):
    layers[0]["calibrated"] = "0" * 16


@pytest.mark.parametrize("change, message", [
    (_other_codec, "layer 1 was coded with 'int2 per-channel'"),
    (_other_calibration, "layer 0 was coded with other calibrated bases"),
])
def test_a_store_coded_otherwise_or_calibrated_otherwise_is_refused_in_one_line(int_model, tmp_path, change,
                                                                                  message):
    """Another calibration gives another allocation (the codecs the method builds now are not the saved ones), or
    the same words over other bases, codebooks or widths."""
    _, path, _ = _saved(int_model, tmp_path)
    bad = str(tmp_path / "other.safetensors")

    def rewrite(meta):
        layers = json.loads(meta["layers"])
        change(layers)
        meta["layers"] = json.dumps(layers)

    _rewrite(path, bad, rewrite)
    with pytest.raises(KvshrinkError, match=message) as err:
        load_cache(bad, int_model)
    assert "\n" not in str(err.value)


def test_another_model_a_junk_file_and_a_missing_one_are_refused(int_model, tmp_path):
    _, path, _ = _saved(int_model, tmp_path)
    other = copy.deepcopy(int_model)
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.add_(0.01)
    with pytest.raises(KvshrinkError, match="other weights"):
        load_cache(path, other)
    (tmp_path / "junk.kvc").write_bytes(b"not a cache")
    with pytest.raises(KvshrinkError, match="not a safetensors file"):
        load_cache(str(tmp_path / "junk.kvc"), int_model)
    with pytest.raises(KvshrinkError, match="does not exist"):
        load_cache(str(tmp_path / "none.kvc"), int_model)
    assert saved_method(str(tmp_path / "junk.kvc")) is None


def test_token_ids_must_be_the_cache_s(int_model, tmp_path):
    cache = from_method("int4", int_model)
    with torch.no_grad():
        int_model(_ids(40), past_key_values=cache, use_cache=True)
    with pytest.raises(KvshrinkError, match="39 token ids for a cache of 40 tokens"):
        cache.save(str(tmp_path / "x.safetensors"), ids=_ids(39))


def test_cli_saves_an_int4_chat_and_resumes_it(tmp_path, capsys, bundled):
    from kvshrink.cli import main

    model, tok = bundled
    path = str(tmp_path / "chat.kvc")
    prompt = "Count: one, two,"
    assert main(["generate", "--method", "int4:block=16", "--prompt", prompt, "--raw", "--max-new-tokens", "30",
                 "--save-cache", path]) == 0
    n = len(tok(prompt).input_ids) + 30 - 1  # the last new token is never fed back
    out = capsys.readouterr().out
    assert f"saved {n} tokens" in out
    assert saved_method(path) == "int4:block=16"
    loaded = load_cache(path, prepare(copy.deepcopy(model), "int4"))
    assert loaded.get_seq_length() == n and loaded.ids.shape == (1, n)
    # --method is the file's, whatever is given
    assert main(["generate", "--resume", path, "--method", "kvcomp-eb0.1", "--prompt", " three,",
                 "--max-new-tokens", "4"]) == 0
    extra = len(tok(" three,", add_special_tokens=False).input_ids)
    assert f"for {n + extra + 4 - 1} tokens" in capsys.readouterr().out
    assert main(["generate", "--method", "snapkv-4x", "--prompt", prompt, "--save-cache", path]) == 2
    err = capsys.readouterr().err
    assert "cannot be saved" in err and len(err.strip().splitlines()) == 1


def _joint_layer(seed, widths):
    """A one-layer cache whose keys are joint-basis codes with this basis and these widths, fed 80 tokens."""
    inverse = torch.eye(16) + 0.2 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(seed))
    keys = JointKeys(inverse, widths, 16, tuple(10000.0 ** (-i / 8) for i in range(8)), 2)
    cache = CompressedCache(num_layers=1, key_codec=keys, value_codec=IntQuant(2, "token"), sink=4, window=0,
                            block=16)
    cache.update(torch.randn(1, 2, 80, 16), torch.randn(1, 2, 80, 16), 0)
    return cache.layers[0]


def test_calibrations_described_alike_are_told_apart():
    """Two joint key codecs of the same bits and coded axes read the same in words; their bases or widths differ,
    and so does what a saved file records of them."""
    widths = [3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1]
    moved = [4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1]
    a, b, c = _joint_layer(0, widths), _joint_layer(1, widths), _joint_layer(0, moved)
    assert a.k.codec.describe() == b.k.codec.describe() == c.k.codec.describe()
    assert len({saved.digest(a), saved.digest(b), saved.digest(c)}) == 3
    assert saved.digest(a) == saved.digest(_joint_layer(0, widths))


def test_a_cache_without_a_method_name_is_refused(int_model, tmp_path):
    cache = CompressedCache(num_layers=2, key_codec=IntQuant(4, "channel", 32), value_codec=IntQuant(4, "token"),
                            block=32)
    with torch.no_grad():
        int_model(_ids(40), past_key_values=cache, use_cache=True)
    with pytest.raises(KvshrinkError, match="build it with kvshrink.from_method"):
        cache.save(str(tmp_path / "x.safetensors"), int_model)
