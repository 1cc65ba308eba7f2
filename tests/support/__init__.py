"""Shared builders of the test suite (no tests here); ``tests/`` is on ``sys.path`` (pyproject's pytest ``pythonpath``).

- ``params``: parameters, gradients, dtypes and shapes to test with;
- ``states``: an optimizer state's values, dequantized; a checkpoint round trip;
- ``numerics``: spacing of floats, a correctly rounded sqrt for the reference;
- ``cpu_states``: parameters, states, gradients and checks of the CPU kernel's tests (imported as ``support.cpu_states``).
"""

from .numerics import exact_sqrt, ulp
from .params import DTYPES, SHAPES, clone_params, gradients, make_params
from .states import dequantized, round_trip

__all__ = ["DTYPES", "SHAPES", "clone_params", "dequantized", "exact_sqrt", "gradients", "make_params", "round_trip", "ulp"]
