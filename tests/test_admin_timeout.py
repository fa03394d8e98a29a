"""An admin command's requests to a volume that stalls for a moment under load: they wait for it
(5 s unless -voltimeout is given), where the server's 1 s failed moves and left old copies behind
in a 1,000,000-key rebalance. Real nginx volumes, a real rebalance process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, holders, placed, ready, restart, write  # noqa: E402
from test_rebalance_scale2 import copied  # noqa: E402


def rebalance_through_a_stall(c, *flags: str) -> subprocess.CompletedProcess:
    """Rebalance onto the cluster's last volume; once moves are under way, an old volume stops
    answering for 3.5 s (SIGSTOP of its nginx), then goes on."""
    args = [sys.executable, "-m", "minikv", "rebalance", "-volumes", ",".join(c.names), "-db",
            str(c.root / "index"), "-replicas", "2", "-subvolumes", "2", "-concurrency", "2", *flags]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while copied(c.volume_dir(c.names[-1])) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, "rebalance ended before its moves were seen"
            time.sleep(0.005)
        with c.volumes[0].held():
            time.sleep(3.5)
            assert proc.poll() is None, "rebalance ended before the stall was over: nothing tested"
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


def test_a_volume_silent_for_3s_mid_rebalance_costs_no_move_and_no_old_copy(make_cluster):
    c = make_cluster(volumes=3, replicas=2, subvolumes=2)
    two = c.names[:2]
    restart(c, two)
    keys = {f"/stall/{i}": os.urandom(2000) for i in range(1500)}
    write(c, keys)
    restart(c, c.names)
    ready(c)
    r = rebalance_through_a_stall(c)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "did not answer" not in r.stderr and " 0 failed" in r.stderr, r.stderr[-3000:]
    for key in keys:
        assert holders(c, key) == placed(c, key, c.names), key  # moved, and no old copy left
    assert admin("verify", c).returncode == 0


def test_an_admin_command_keeps_a_voltimeout_it_is_given(make_cluster):
    # the 5 s is a default, not a floor: an operator who wants a stalled volume to fail fast says so
    c = make_cluster(volumes=3, replicas=2, subvolumes=2)
    restart(c, c.names[:2])
    write(c, {f"/given/{i}": os.urandom(2000) for i in range(1500)})
    restart(c, c.names)
    ready(c)
    r = rebalance_through_a_stall(c, "-voltimeout", "0.5s")
    assert "did not answer" in r.stderr and "within 0.5s" in r.stderr, r.stderr[-3000:]
