"""Running the Triton kernels on the CPU, in Triton's interpreter.

The interpreter must be chosen before ``triton`` is first imported in a process (``triton.jit``
decides then, for Triton's own library functions too), and a process that runs real GPU kernels
cannot also interpret: so the interpreted tests (``tests/kernels/triton``) run in a pytest process
of their own, started with ``TRITON_INTERPRET=1`` (``scripts/test.sh``), and are skipped in any
other. ``INTERPRETER_MARKS`` is their module-level ``pytestmark``.
"""

from __future__ import annotations

import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

INTERPRETER_MARKS = [
    pytest.mark.skipif(not INTERPRETING, reason="runs in Triton's interpreter: TRITON_INTERPRET=1 pytest tests/kernels/triton"),
    # numpy, inside the interpreter, on NaN / Inf lanes: expected
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]
