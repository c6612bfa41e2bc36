"""The compatibility layer's megatron-core CPU shim (pretrain/compat.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]


def test_cpu_shim_not_applied_with_a_gpu():
    """In a fresh interpreter that believes it has a GPU, the shim patches nothing."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,"
        " torch.cuda.get_rng_state)\n"
        "from pretrain.compat import apply_cpu_shim, is_cpu_shim_applied\n"
        "assert apply_cpu_shim() is False and apply_cpu_shim() is False\n"
        "assert not is_cpu_shim_applied()\n"
        "assert originals == (torch.cuda.current_device, torch.cuda.synchronize,"
        " torch.cuda.manual_seed, torch.cuda.get_rng_state)\n"
        "assert torch._C._len_torch_function_stack() == 0\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without a GPU")
def test_cpu_shim_applies_once_and_maps_cuda_to_cpu():
    import logging

    from megatron.core.tensor_parallel import random as mcore_random

    from pretrain.compat import apply_cpu_shim, is_cpu_shim_applied

    def shim_targets():
        return (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.manual_seed,
                torch.cuda.get_rng_state, mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)

    assert apply_cpu_shim() is True and is_cpu_shim_applied()
    patched = shim_targets()
    modes = torch._C._len_torch_function_stack()
    filters = len(logging.getLogger(mcore_random.__name__).filters)
    assert apply_cpu_shim() is True  # idempotent: nothing is re-patched or stacked
    assert patched == shim_targets()
    assert torch._C._len_torch_function_stack() == modes >= 1
    assert len(logging.getLogger(mcore_random.__name__).filters) == filters

    assert torch.ones(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without a GPU")
def test_cuda_literal_mapping_can_be_suspended():
    """The trainer's non-pipelined step runs without the per-call device mapping (it costs
    ~7% of a small CPU step); inside, a literal CUDA device fails loudly, and the mapping
    is back afterwards, also after an exception. The other patches stay in effect."""
    from pretrain.compat import apply_cpu_shim, cuda_literals_unmapped

    apply_cpu_shim()
    modes = torch._C._len_torch_function_stack()
    with cuda_literals_unmapped():
        assert torch._C._len_torch_function_stack() == modes - 1
        assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
        with pytest.raises((AssertionError, RuntimeError)):
            torch.ones(2, device="cuda")
    with pytest.raises(ValueError):
        with cuda_literals_unmapped():
            raise ValueError("inside")
    assert torch._C._len_torch_function_stack() == modes
    assert torch.ones(2, device="cuda").device.type == "cpu"
