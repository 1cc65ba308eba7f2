"""Shared builders of the test suite (no tests here); ``tests/`` is on ``sys.path`` (pyproject's pytest ``pythonpath``).

- ``params``: parameters, gradients, dtypes and shapes to test with;
- ``states``: an optimizer state's values, dequantized; a checkpoint round trip;
- ``numerics``: spacing of floats;
- ``cases``: the fused backends' cases from ``kernels.rules.RULES``: rules, layouts (4-bit too), dtypes,
  fresh states (and their draws: stochastic rounding), gradients, each rule's hyperparameters;
- ``oracle``: a backend's update against the reference's, bit for bit, step by step;
- ``spy``: counting the calls of a function;
- ``interpreter``: the marks of the tests that run in Triton's interpreter;
- ``bnb_fixtures``: bitsandbytes 0.50.2's checkpoints in ``tests/data`` and layout comparisons (``tests/compat``);
- ``launch``: multi-process runs of the worker scripts in ``tests/workers`` under torch.distributed;
- ``paging``: a fake managed memory, so that paged optimizers are tested on the CPU;
- ``zero_point``: the cases of the never-negative states' quantizer rule (imported as ``support.zero_point``);
- ``weights``: a 16-bit parameter's weight formats (master corrections, stochastic rounding) as cases
  (imported as ``support.weights``; the oracle takes one);
- ``cpu_states``: parameters, states, gradients and checks of the CPU kernel's tests (imported as ``support.cpu_states``).
"""

from .cases import (FOUR_BIT, FOUR_BIT_RULES, LAYOUTS, PARAM_DTYPES, RULES, TRUST_RULES, copy_state, dtype_id, edge_gradient, fresh,
                    gradient, hyper, with_draws)  # fmt: skip
from .interpreter import INTERPRETER_MARKS, INTERPRETING
from .launch import WORKERS, free_port, launch
from .numerics import ulp
from .oracle import assert_backend_matches_reference, assert_same, assert_same_state
from .params import DTYPES, SHAPES, clone_params, gradients, make_params
from .spy import count_calls
from .states import block_scales, dequantized, round_trip

__all__ = [
    "DTYPES", "FOUR_BIT", "FOUR_BIT_RULES", "INTERPRETER_MARKS", "INTERPRETING", "LAYOUTS", "PARAM_DTYPES", "RULES", "SHAPES", "TRUST_RULES",
    "assert_backend_matches_reference", "assert_same", "assert_same_state", "block_scales", "clone_params", "copy_state", "count_calls",
    "dequantized", "dtype_id", "edge_gradient", "free_port", "fresh", "gradient", "gradients", "hyper", "launch", "make_params",
    "round_trip", "ulp", "with_draws", "WORKERS",
]  # fmt: skip
