import pytest


@pytest.fixture
def triton_backend():
    """The Triton backend, compiled for the GPU (not interpreted)."""
    pytest.importorskip("triton")
    from qoptim.kernels import triton as tk

    assert not tk.INTERPRETED, "TRITON_INTERPRET is set: these tests need compiled kernels"
    return tk
