"""Launch N CPU worker processes of one test file on 127.0.0.1 under `jax.distributed` and wait for them.

Each worker runs `python SCRIPT ADDRESS PROCESS_ID OUT` with D simulated CPU devices; the test reads OUT.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str | Path, out: Path, processes: int, devices_per_process: int, timeout_s: float) -> None:
    """Run the workers; fail the test with the log of any process that did not exit 0 (one that fails stops
    the wait: the others would wait for it until the coordinator times out)."""
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = [p.communicate()[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{logs[i][-3000:]}"
