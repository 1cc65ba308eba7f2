"""Property test: the fused CPU kernel equals the reference on random shapes, dtypes, layouts,
hyperparameters and gradients (including NaN/Inf), bit for bit."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cpu_states import copy_state, make_state

from qoptim.kernels import Hyper, cpu, reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.0, 1e-5, 1e-3, 0.1]),
        "beta1": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
        "beta2": st.sampled_from([0.0, 0.9, 0.999, 0.99999]),
        "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-2, 0.5]),
        "decoupled": st.booleans(),
        "gnorm_scale": st.sampled_from([1.0, 0.25]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3000),
    dtype=st.sampled_from(list(DTYPES)),
    layout=st.sampled_from(["block", "whole", "fp32"]),
    hp=hyperparameters,
    steps=st.integers(1, 4),
    grad_scale=st.sampled_from([0.0, 1e-6, 1e-2, 10.0]),
    bad=st.lists(st.integers(0, 10**6), max_size=3),
    skip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_reference(n, dtype, layout, hp, steps, grad_scale, bad, skip, seed):
    dtype = DTYPES[dtype]
    p_ref, slots_ref = make_state(n, dtype, layout, seed=seed)
    p, slots = copy_state(p_ref, slots_ref)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        g = torch.randn(n, generator=gen) * grad_scale
        for i, position in enumerate(bad):
            g[position % n] = (float("nan"), float("inf"), -float("inf"))[i % 3]
        g = g.to(dtype)
        h = Hyper(step=step, **hp)
        expected = reference.update("adam", p_ref, g, slots_ref, h, skip)
        got = cpu.update("adam", p, g, slots, h, skip)
        assert got == expected
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(slots, slots_ref):
            torch.testing.assert_close(a.values, b.values, rtol=0, atol=0, equal_nan=True)
            if a.absmax is not None:
                torch.testing.assert_close(a.absmax, b.absmax, rtol=0, atol=0, equal_nan=True)


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
