"""The ``path`` fixture of the CPU kernel's tests: a test run on each path of the table lookups."""

import pytest

from qoptim.kernels.cpu import paths

PATHS = {"avx512": paths.AVX512, "avx2": paths.AVX2, "portable": paths.PORTABLE}


@pytest.fixture(params=list(PATHS))
def path(request):
    """Run a test on each path: AVX-512 permutes (where the CPU has them: it would not run
    elsewhere), AVX2's gathers and two-register permutes (forced on here; where the CPU lacks AVX2
    the gathers are emulated and the 4-bit lookups take the scalar loops: still correct, only
    slower), and the portable scalar loops."""
    marker = PATHS[request.param]
    if marker is paths.AVX512 and not paths.HAS_AVX512:
        pytest.skip("this CPU lacks AVX-512 VBMI")
    with paths.force(marker):
        yield marker
