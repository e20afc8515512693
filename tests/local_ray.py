"""Start a local Ray for a test module, surviving a slow node start on a loaded machine.

Ray 2.55 gives its start-up fixed waits that no argument changes (ray/_private/node.py): 30 s for the raylet
to register with the GCS ("The current node timed out during startup") and a wait for the GCS to write its
port file ("Timed out waiting for file .../gcs_server_port_..."). On a 2-core machine with another CPU-bound
process running, the start can take longer: a clean-clone CI run on 2026-12-06 lost 8 tests of
tests/client/test_verl_reward_loop.py to the first while a stage-0 caching pass held both cores, and 20 runs
of the three Ray test modules beside a training job hit the first four times (retried, passed) and the second
once. The tests are about rewardsvc, not about Ray's start-up time, so a timed-out start is stopped and tried
again; any other error, or a third timeout, fails the test as before.
"""

from __future__ import annotations

import warnings

import ray
from ray._private.node import Node

STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
ATTEMPTS = 3


def start_local_ray(**options) -> None:
    """`ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **options)`, retried on a slow start."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **options)
            return
        except Exception as error:  # Ray raises a bare Exception or a RuntimeError for these
            if not any(message in str(error) for message in STARTUP_TIMEOUTS) or attempt == ATTEMPTS:
                raise
            warnings.warn(f"local Ray start {attempt} of {ATTEMPTS} timed out; starting it again", stacklevel=2)
            stop_half_started_node(error)
            ray.shutdown()


def stop_half_started_node(error: BaseException) -> None:
    """Kill the GCS and raylet the failed start left running.

    Both timeouts are raised inside `Node.__init__`, so `ray.shutdown()` never sees that node (ray.init had not
    stored it yet) and its processes would live until the interpreter exits. The node is `self` in a frame
    of the traceback.
    """
    frame = error.__traceback__
    while frame is not None:
        node = frame.tb_frame.f_locals.get("self")
        if isinstance(node, Node):
            node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
            return
        frame = frame.tb_next
