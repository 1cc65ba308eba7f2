"""Shared builders of the test suite (no tests here); ``tests/`` is on ``sys.path`` (pyproject's pytest ``pythonpath``).

- ``params``: parameters, gradients, dtypes and shapes to test with;
- ``states``: an optimizer state's values, dequantized; a checkpoint round trip;
- ``numerics``: spacing of floats, a correctly rounded sqrt for the reference;
- ``bnb_fixtures``: bitsandbytes 0.50.2's checkpoints in ``tests/data`` and layout comparisons (``tests/compat``);
- ``launch``: multi-process runs of the worker scripts in ``tests/workers`` under torch.distributed.
"""

from .launch import WORKERS, free_port, launch
from .numerics import exact_sqrt, ulp
from .params import DTYPES, SHAPES, clone_params, gradients, make_params
from .states import dequantized, round_trip

__all__ = [
    "DTYPES", "SHAPES", "WORKERS", "clone_params", "dequantized", "exact_sqrt", "free_port", "gradients", "launch", "make_params",
    "round_trip", "ulp",
]  # fmt: skip
