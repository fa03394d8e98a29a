"""Rebalance's moves against bad replicas and dying volumes: a move asks no volume for the size
of a copy (no HEAD), so the copy itself is checked against the size its record names, and a
volume that dies mid-rebalance fails those moves cleanly. Real volumes, real index processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, holders, placed, ready, restart, write  # noqa: E402

from minikv.index.record import LIVE, PENDING, decode_data  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2path, key2volume  # noqa: E402


def disk(c, volume: str, key: str) -> Path:
    return c.volume_dir(volume) / key2path(key.encode()).lstrip("/")


def test_a_move_refuses_a_copy_whose_size_is_not_its_records(make_cluster):
    """A replica cut short on its volume is not copied onto the new one: the move takes the
    other replica (small values, copied whole, and big ones, streamed alike); a key with no
    replica of the right size is not moved, says why, and stays as it was."""
    c = make_cluster(volumes=4, replicas=2, subvolumes=4)
    three = c.names[:3]
    restart(c, three)
    keys = {f"/size/{i}": os.urandom(500 if i % 2 else 40_000) for i in range(40)}
    write(c, keys)
    moving = [k for k in keys if placed(c, k, c.names) - placed(c, k, three)]
    assert len(moving) >= 6
    cut = moving[:-1]
    both = moving[-1]
    for key in cut:  # the first replica, the one a move copies from when all are up
        disk(c, key2volume(key.encode(), three, 2, 4)[0], key).write_bytes(keys[key][:100])
    for volume in key2volume(both.encode(), three, 2, 4):
        disk(c, volume, both).write_bytes(keys[both][:100])
    restart(c, c.names)
    ready(c)

    r = admin("rebalance", c)

    assert r.returncode == 1, r.stderr
    assert "1 failed" in r.stderr and "holds 100 bytes" in r.stderr and "record says" in r.stderr, r.stderr
    for key in cut:
        for volume in placed(c, key, c.names) - placed(c, key, three):
            assert disk(c, volume, key).read_bytes() == keys[key], key  # the good replica's bytes
    store = Store(str(c.root / "index"))
    try:
        rec = store.get(both.encode())
        assert not store.pending_records()
    finally:
        store.close()
    assert rec[0] == LIVE and set(decode_data(rec).volumes) == placed(c, both, three)
    assert holders(c, both) == placed(c, both, three)  # nothing copied, nothing deleted


def copied(directory: Path) -> int:
    """Values in a volume's folder (its svXX/aa/bb files)."""
    return sum(len(files) for sv in directory.glob("sv*") for _, _, files in os.walk(sv))


def wait_refused(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        assert time.monotonic() < deadline, f"port {port} still answers"
        time.sleep(0.05)


def test_a_volume_dying_mid_rebalance_fails_its_moves_and_leaves_nothing_locked(make_cluster):
    """The new volume stops while keys are being moved onto it: those moves fail (the command
    says which volume, exits 1), their half-made copies are gone and no record stays PENDING;
    every key is still readable, and rebalance run again with the volume back completes."""
    c = make_cluster(volumes=4, replicas=2, subvolumes=4)
    three = c.names[:3]
    restart(c, three)
    keys = {f"/dying/{i}": os.urandom(20_000) for i in range(500)}
    write(c, keys)
    restart(c, c.names)
    ready(c)
    want = {k.encode(): key2volume(k.encode(), c.names, 2, 4) for k in keys}

    def moved(store: Store) -> int:
        pairs, _ = store.scan(b"/dying/")
        return sum(1 for k, v in pairs if v[0] != PENDING and decode_data(v).volumes == want[k]
                   and want[k] != key2volume(k, three, 2, 4))

    args = [sys.executable, "-m", "minikv", "rebalance", "-volumes", ",".join(c.names), "-db",
            str(c.root / "index"), "-replicas", "2", "-subvolumes", "4", "-concurrency", "1"]
    store = Store(str(c.root / "index"))
    try:
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            # the copies go first and the switches follow in batches: 20 copies on the new
            # volume is the sign that moves are under way, with many more still to copy
            while copied(c.volume_dir(c.names[3])) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            # paused while the volume dies: on a fast machine the remaining moves would
            # otherwise all be done before the kill takes effect
            os.killpg(proc.pid, signal.SIGSTOP)  # its own session: the process and any child
            try:
                c.volumes[3].stop(signal.SIGKILL)  # its process group, nginx included
                wait_refused(c.volumes[3].port)
            finally:
                os.killpg(proc.pid, signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        done = moved(store)
        left = store.pending_records()
    finally:
        store.close()
    to_move = sum(1 for k in keys if want[k.encode()] != key2volume(k.encode(), three, 2, 4))
    assert done < to_move, (done, to_move)
    assert proc.returncode == 1, err
    assert f"volume {c.names[3]}" in err, err
    assert not left  # every failed move put its record back
    c.volumes[3].start()
    ready(c)
    for key, value in keys.items():
        assert c.get(quote(key)).content == value, key
    r = admin("rebalance", c)
    assert r.returncode == 0, r.stderr
    for key, value in keys.items():
        assert holders(c, key) == placed(c, key, c.names), key
        assert c.get(quote(key)).content == value, key
    assert admin("verify", c).returncode == 0
