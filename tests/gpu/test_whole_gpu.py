"""GPU tests that need the whole GPU to themselves: they fill its memory. ``scripts/gpu-check.sh``
runs this file alone, after the other GPU tests (which it may run in parallel). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import qoptim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def test_paged_states_beyond_free_gpu_memory_still_step(triton_backend):
    """Fill the GPU so that the paged states do not fit next to the parameter: the driver must
    evict them to the host and page them back for each step."""
    n = 1 << 26  # 64M elements: 256 MB fp32 parameter, 256 MB gradient, 2 x 256 MB fp32 states
    p = torch.nn.Parameter(torch.randn(n, device=CUDA) * 0.1)
    p.grad = torch.randn(n, device=CUDA) * 0.01
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    headroom = 64 << 20  # room for the kernels' small buffers, not for the states
    blocker = torch.empty(max(0, free - headroom), dtype=torch.uint8, device=CUDA)
    before = p.detach().cpu()
    try:
        opt = qoptim.optim.PagedAdamW32bit([p], lr=1e-3)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        assert opt.state[p]["state1"].is_paged and opt.state[p]["state2"].is_paged
    finally:
        del blocker
        torch.cuda.empty_cache()
    after = p.detach().cpu()
    assert bool(torch.isfinite(after).all()) and not torch.equal(after, before)
    assert float(opt.state[p]["state2"].abs().max()) > 0
