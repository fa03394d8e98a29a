"""Ctrl-C of an admin command whose walk runs in several processes (admin/parts.py), at the
moment those processes start: the command stops as asked (exit 130, what it did summarised), and
never reports a process it stopped itself as one that died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import ready, write  # noqa: E402
from test_walk_scale import spawned  # noqa: E402


def interrupted_at_start(c, command: str, sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """`minikv <command> -workers 2` given Ctrl-C (SIGINT to its process group, as a terminal
    sends it; or `sig` so, as `kill -TERM -PGID` or systemd does) as soon as its walking processes
    exist, before they can set up their handlers."""
    # a rebuild into an index of its own each time: one stopped after its first folders has
    # written them, and the next would refuse to add to that index without -force (exit 2)
    db = c.root / ("index" if command == "verify" else f"rebuilt-{time.monotonic_ns()}")
    args = [sys.executable, "-m", "minikv", command, "-volumes", ",".join(c.names), "-db", str(db),
            "-replicas", "2", "-subvolumes", "2", "-workers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(spawned(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, f"{command} walked without processes"
            time.sleep(0.001)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_as_the_walking_processes_start_stops_the_command_cleanly(make_cluster):
    # a part killed by the SIGTERM its parent sent before it set its handler was reported as
    # "a rebuild process exited with -15 before it finished"; one reached by the terminal's
    # SIGINT before it ignored it died with a KeyboardInterrupt traceback
    c = make_cluster(volumes=2, replicas=2, subvolumes=2)
    write(c, {f"/sig/{i}": os.urandom(20) for i in range(40)})
    ready(c)
    for command in ("rebuild", "verify", "rebuild", "verify"):
        got = interrupted_at_start(c, command)
        assert got.returncode == 130, (command, got.returncode, got.stderr)
        assert "exited with" not in got.stderr, (command, got.stderr)
        assert "Traceback" not in got.stderr and "KeyboardInterrupt" not in got.stderr, (command, got.stderr)
        assert "incomplete" in got.stderr or "stopping" in got.stderr, (command, got.stderr)


def test_a_sigterm_to_the_process_group_as_the_walking_processes_start_stops_it_cleanly(make_cluster):
    # a part still starting died of it at once (-15) and was reported as a process that failed
    c = make_cluster(volumes=2, replicas=2, subvolumes=2)
    write(c, {f"/term/{i}": os.urandom(20) for i in range(40)})
    ready(c)
    for command in ("rebuild", "verify", "rebuild", "verify"):
        got = interrupted_at_start(c, command, signal.SIGTERM)
        assert got.returncode == 130, (command, got.returncode, got.stderr)
        assert "exited with" not in got.stderr and "Traceback" not in got.stderr, (command, got.stderr)
