import copy
import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker (spinning threads cost more)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
if not torch.cuda.is_available():  # Triton kernels run in its interpreter, chosen before transformers imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# property tests draw the same examples on every run, so that CI cannot fail by the luck of a draw
# (two stops' CI runs each found a float32 rounding edge in a test's tolerance that way);
# HYPOTHESIS_PROFILE=explore draws new ones
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))


@pytest.fixture(scope="session")
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # a copy: preparing a model sets its attention on its config object, which tests share otherwise
    model = LlamaForCausalLM(copy.deepcopy(tiny_config)).eval()
    return model


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M (model, tokenizer), loaded once (under a second from its converted folder)."""
    from kvshrink import load_model

    return load_model()


@pytest.fixture(scope="session")
def calibrated(tiny_model, tmp_path_factory):
    """A budget calibration (families/budget) of the tiny model on random tokens, saved: (calibration, its path)."""
    from kvshrink.families.budget import allocate

    ids = torch.randint(3, 128, (2, 4 + 3 * 32), generator=torch.Generator().manual_seed(0))
    calib = allocate.calibrate(tiny_model, ids, {"test": True}, sink=4, block=32)
    path = str(tmp_path_factory.mktemp("auto") / "auto.safetensors")
    calib.save(path)
    return calib, path
