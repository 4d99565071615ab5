"""The Triton kernels compile for a Hopper GPU (sm_90), checked on a machine without one.

Triton's interpreter, which runs the kernels in test_triton.py and test_matrix.py, accepts code a GPU
compile refuses (an H200 found two such bugs). `scripts/triton_compile_check.py` captures the launches
a dozen methods make and compiles each for sm_90 with Triton's compiler and ptxas: no GPU needed.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton is the gpu extra")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "triton_compile_check.py")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="Triton's NVIDIA tools are not installed")
def test_every_kernel_launch_of_the_methods_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled kernels, not the interpreter
    # one method per kernel variant, the two bugs' cases among them (8-bit codes; ZDC ranks under 16);
    # the script's default list covers more, at twice the time (a cold compile is about 1.5 s a launch)
    methods = "int8-rot,int2:prerope=1,zdc-adaptive-75+int3,rvq-d2,kvc-8x+int4,kvcomp-eb0.1"
    proc = subprocess.run([sys.executable, SCRIPT, "--methods", methods], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    compiled = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert set(compiled) == {"_coded_body", "_logits", "_values", "_kvcomp"}  # every kernel was reached
    assert len(compiled) >= 8  # 8-bit, turned, three ZDC rank sets, RVQ, rows and KVComp launches
