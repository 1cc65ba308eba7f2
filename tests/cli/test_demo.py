"""`qoptim demo`'s training processes (qoptim.cli.demo); the demo's table is tested end to end in test_cli.py."""

import multiprocessing as mp
import os

from qoptim.cli.demo import wait_for_result


def test_a_training_process_that_dies_is_reported_not_waited_on():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=os._exit, args=(3,))  # dies without putting a result
    child.start()
    status, message = wait_for_result(child, queue)
    child.join()
    assert status == "error" and "exited with code 3" in message
