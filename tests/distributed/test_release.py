"""Gradient release under torch.distributed on CPU (gloo, 2 processes): FSDP2 (its hooks run after
the reduce-scatter) the same as the normal loop bit for bit, micro-batches without gradient sync
accumulated exactly, and DDP and FSDP1 refused. One launch of tests/workers/release_worker.py."""

from __future__ import annotations

import json

import pytest
import torch
from support import WORKERS, launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("release")
    launch(WORKERS / "release_worker.py", str(out))
    return json.loads((out / "results.json").read_text())


def test_fsdp2_release_matches_the_normal_loop(results):
    r = results["fsdp2"]
    assert r["equal"], "local shards of parameters and 8-bit states must equal the normal loop's, bit for bit"
    assert r["freed"] and r["dtensor_states"] and r["steps"] == 4


def test_fsdp2_accumulation_without_gradient_sync(results):
    r = results["fsdp2"]
    assert r["accumulated_equal"], "set_requires_gradient_sync(False) micro-batches: the same as the normal loop's accumulation"
    assert r["accumulation_refused"], "a second synchronized backward before step() must be refused"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp1"])
def test_ddp_and_fsdp1_are_refused(results, wrapper):
    assert "needs every parameter sharded by FSDP2" in results[f"{wrapper}_refused"]
