"""Parking (serve/park.py): a cache written to disk and read back continues exactly as it would have."""

import copy
import os

import pytest
import torch

from kvshrink import from_method, prepare
from kvshrink.families.lowrank import transform as zdc
from kvshrink.serve.park import Parking


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
