"""Parking (serve/park.py): a cache written to disk and read back continues exactly as it would have."""

import copy
import os

import pytest
import torch

from kvshrink import from_method, prepare
from kvshrink.families.lowrank import transform as zdc
from kvshrink.codecs.base import tensor_nbytes
from kvshrink.serve.park import Parking, fork


def _filled(model, method, n=100, steps=3):
    cache = from_method(method, model)
    ids = torch.randint(3, 128, (1, n + steps + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for at in range(0, n, 32):
            model(ids[:, at:min(at + 32, n)], past_key_values=cache)
        for i in range(n, n + steps):
            model(ids[:, i:i + 1], past_key_values=cache)
    return cache, ids[:, -1:]


@pytest.mark.parametrize("method", ["fp16", "int4", "int2-rot", "kvc-8x", "kvcomp-eb0.1", "zdc-50"])
def test_a_parked_cache_resumes_bit_for_bit_and_writes_its_payload_only(tiny_model, method, tmp_path):
    model = copy.deepcopy(tiny_model)
    if method.startswith("zdc"):
        torch.manual_seed(1)
        model = zdc.apply(model, zdc.calibrate(model, torch.randint(3, 128, (2, 48)), {"test": True}))
    prepare(model, method)
    cache, nxt = _filled(model, method)
    held = cache.nbytes()
    parking = Parking(str(tmp_path))
    written = parking.park("r1", cache)
    assert parking.nbytes() == written and "r1" in parking
    # the payload and pickle's framing (under 1 KiB a tensor), not the model's matrices or a second copy
    assert held <= written <= held + 1024 * len(cache.payload())
    back = parking.resume("r1")
    assert "r1" not in parking and os.listdir(tmp_path) == []
    assert back.nbytes() == held
    with torch.no_grad():
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=back).logits
    assert torch.equal(a, b)
    assert back.nbytes() == cache.nbytes()


def test_parking_discards_and_removes_its_own_folder(tiny_model):
    model = copy.deepcopy(tiny_model)
    cache, _ = _filled(model, "fp16", n=20, steps=0)
    parking = Parking()
    parking.park("a", cache)
    parking.park("b", cache)
    folder = parking.folder
    assert sorted(os.listdir(folder)) == ["a.pkl", "b.pkl"]
    parking.discard("a")
    assert os.listdir(folder) == ["b.pkl"] and parking.nbytes() > 0
    parking.close()
    assert not os.path.exists(folder) and parking.nbytes() == 0


@pytest.mark.parametrize("method", ["fp16:block=32", "int4:block=32", "int2-rot", "kvcomp-eb0.1", "zdc-50"])
def test_a_fork_and_its_original_grow_apart_as_two_caches_would(tiny_model, method):
    """Fed different tokens after a fork (a prompt chunk, then decode steps), each gives the logits
    of a cache that never forked, bit for bit. Families that read the body in parts (int, fp16) go on
    holding the blocks frozen at the fork once, however far both grow."""
    model = copy.deepcopy(tiny_model)
    if method.startswith("zdc"):
        torch.manual_seed(1)
        model = zdc.apply(model, zdc.calibrate(model, torch.randint(3, 128, (2, 48)), {"test": True}))
    prepare(model, method)
    a, _ = _filled(model, method, steps=0)
    b = fork(a)
    frozen = a.shareable_nbytes()
    assert frozen > 0 and b.shareable_nbytes() == frozen
    g = torch.Generator().manual_seed(5)
    for cache in (a, b):
        cont = torch.randint(3, 128, (1, 75), generator=g)
        twin, _ = _filled(model, method, steps=0)
        with torch.no_grad():
            for at, stop in ((0, 70), (70, 71), (71, 72), (72, 73), (73, 74), (74, 75)):
                got = model(cont[:, at:stop], past_key_values=cache).logits
                want = model(cont[:, at:stop], past_key_values=twin).logits
                assert torch.equal(got, want)
        assert cache.nbytes() == twin.nbytes()
    common = {t.untyped_storage().data_ptr() for t in a.payload()} & {t.untyped_storage().data_ptr() for t in b.payload()}
    together, apart = tensor_nbytes(a.payload() + b.payload()), tensor_nbytes(a.payload()) + tensor_nbytes(b.payload())
    assert together == apart - tensor_nbytes([t for t in a.payload() if t.untyped_storage().data_ptr() in common])
    if method.split(":")[0] in ("fp16", "int4", "int2-rot"):
        assert together <= apart - frozen
