"""The ``bnb`` fixture of the live compatibility tests: bitsandbytes 0.50.2 itself, or a skip."""

import pytest


@pytest.fixture(scope="module")
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    if bnb.__version__ != "0.50.2":
        pytest.skip(f"written against bitsandbytes 0.50.2, found {bnb.__version__}")
    return bnb
