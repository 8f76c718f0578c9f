"""Two processes on 127.0.0.1, 2 forced CPU devices each, one TP = 4 mesh: process 0 schedules
and broadcasts each step, and the outputs are those of one process (the reference's)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = TESTS / "helpers" / "multiprocess_run.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_one_mesh_give_the_reference_tokens():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(port), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-4000:]
    leader = json.loads(results[0][0].strip().splitlines()[-1])
    follower = json.loads(results[1][0].strip().splitlines()[-1])
    assert follower == {"follower_outputs": 0}
    assert len(leader) == 15
    for out in leader:
        assert out["tokens"] == out["reference"], out["case"]
