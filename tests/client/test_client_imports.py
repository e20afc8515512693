"""A trainer that only wants scores imports the client and the trainer integrations without torch,
transformers or the server."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
import rewardsvc.client
import rewardsvc.integrations.trl, rewardsvc.integrations.verl, rewardsvc.integrations.openrlhf
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "modules": sorted(sys.modules)}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_client_imports_neither_torch_nor_the_server():
    modules = set(_probe()["modules"])
    for heavy in ("torch", "transformers", "numpy", "safetensors", "prometheus_client"):
        assert heavy not in modules, f"import rewardsvc.client loaded {heavy}"
    ours = {m for m in modules if m.startswith("rewardsvc.")}
    assert not {m for m in ours if m.split(".")[1] in ("model", "serving", "training", "evaluation", "cli")}, ours


def test_client_imports_in_under_half_a_second():
    # CPU time of the import, best of three: wall time also counts waiting for a core that other jobs hold
    # (about 0.2 s either way on an idle 2-core machine).
    probes = [_probe() for _ in range(3)]
    best = min(p["cpu_s"] for p in probes)
    assert best < 0.5, f"import rewardsvc.client took {best:.2f} s of CPU ({min(p['wall_s'] for p in probes):.2f} s wall)"
