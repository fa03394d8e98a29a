"""No acknowledged write is lost: a CI-sized run of bench/faults.py, plus what the index
promises about durability (-fsync).

Each fault runs a short mixed load (writers, readers, a deleter; values up to 512 KB) on a
cluster of its own, injects the fault, removes it, and checks the clients' ledger against the
cluster (see bench/faults.py for the invariants). Faults that need root (tmpfs) or network
namespaces skip cleanly without them. The whole module stays around 80 s on 2 cores; the full
run with longer phases and multi-MB values is `bench/faults.py` (figures in RELIABILITY.md).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import faults  # noqa: E402

CI = faults.Timing(warm=0.8, fault=1.5, after=0.8, sigstop=faults.STALL + 1.5)


def run_fault(cls: type[faults.Scenario]) -> faults.Result:
    why = faults.skip_reason(cls)
    if why:
        pytest.skip(why)
    root = Path(faults.tempfile.mkdtemp(prefix="minikv-rel-"))
    root.chmod(0o755)
    try:
        return cls(CI, threads=1, big=512 << 10, pace=0.01).run(root / cls.name)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def assert_clean(res: faults.Result) -> None:
    broken = {k: v[:5] for k, v in res.violations.items() if isinstance(v, list) and v}
    assert not broken, f"{res.fault}: {broken}"
    assert res.lost == 0
    for name, p in res.phases.items():
        assert p["hangs"] == 0, f"{res.fault}: {p['hangs']} request(s) hung in phase {name}"
        assert p["errors_without_reason"] == 0, f"{res.fault}: a 5xx without a reason in phase {name}"
        assert p["unexpected"] == 0, f"{res.fault}: unexpected answers: {res.notes}"
        # a clear error comes within the volume timeouts (stall 5 s + the clean-up's 1 s)
        assert p["max_error_s"] < faults.STALL + 4, f"{res.fault}: a 5xx took {p['max_error_s']:.1f}s"
    assert res.recover_s is not None, f"{res.fault}: writes never worked again"
    assert res.acked > 0
    assert not [n for n in res.notes if n.startswith("driver error")], res.notes


@pytest.mark.parametrize("cls", faults.SCENARIOS, ids=[c.name for c in faults.SCENARIOS])
def test_fault(cls):
    res = run_fault(cls)
    assert_clean(res)
    if cls in (faults.VolumeKill9, faults.VolumeReadonly, faults.VolumeFull):
        # the fault really bit: writes to that volume failed while it was on
        assert res.phases["fault"]["puts_5xx"] > 0, res.phases["fault"]


# ---------------------------------------------------------------- durability of the index


def _fsync_calls(make_cluster, flags: list[str], puts: int = 40, threads: int = 1) -> int:
    """fdatasync/fsync/msync calls the index workers make for `puts` PUTs (seen by strace),
    sent by `threads` clients at once."""
    c = make_cluster(volumes=1, replicas=1, subvolumes=1, workers=1, flags=flags)
    from test_faults import _children, wait_until

    # its one worker: `strace -f` follows only what is forked after it attached, not the supervisor's
    wait_until(lambda: len(_children(c.index.proc.pid)) == 1, what="the worker started")
    [pid] = _children(c.index.proc.pid)
    out = Path(faults.tempfile.mktemp(prefix="minikv-strace-"))
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,msync,sync_file_range",
                               "-o", str(out), "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    try:
        # strace says "Process N attached" once it traces: the PUTs must not start before (on a
        # loaded machine a fixed pause can be too short, and the syncs would not all be counted)
        said = tracer.stderr.readline()
        assert "attached" in said, said

        def client(n: int) -> None:
            s = requests.Session()
            for _ in range(n):
                assert s.put(c.url(f"/d/{uuid.uuid4().hex}"), data=b"v" * 100).status_code == 201

        workers = [threading.Thread(target=client, args=(puts // threads,)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        tracer.send_signal(signal.SIGINT)  # our own strace: detach and write the summary
        tracer.wait(10)
    text = out.read_text()
    out.unlink()
    return sum(int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?\w+$",
                                                     text, re.M))


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
@pytest.mark.skipif(os.geteuid() != 0, reason="strace -p needs root (ptrace)")
def test_fsync_flag_syncs_every_index_commit(make_cluster):
    """-fsync: each PUT's two commits (PENDING, LIVE) reach the disk before the 201; without
    it the index never syncs (a process crash loses nothing, a power loss may)."""
    assert _fsync_calls(make_cluster, []) == 0
    assert _fsync_calls(make_cluster, ["-fsync"], puts=40) >= 2 * 40


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
@pytest.mark.skipif(os.geteuid() != 0, reason="strace -p needs root (ptrace)")
def test_fsync_commits_of_concurrent_writes_are_grouped(make_cluster):
    """-fsync with 16 clients at once: commits that wait together share one flush
    (index/group.py), so there are clearly fewer syncs than the 4 a lone PUT costs."""
    assert _fsync_calls(make_cluster, ["-fsync"], puts=160, threads=16) < 0.75 * 4 * 160


def test_acknowledged_writes_survive_kill9_of_the_index_without_fsync(make_cluster):
    """A process crash right after the 201s loses none of them: LMDB's commits are in the
    page cache even when not fsync'd."""
    c = make_cluster(volumes=3, replicas=2, workers=2)
    keys = [f"/crash/{uuid.uuid4().hex}" for _ in range(200)]
    s = requests.Session()
    for k in keys:
        assert s.put(c.url(k), data=k.encode()).status_code == 201
    faults.kill_index(c)  # no warning, no clean close of LMDB
    c.index = c._index(2, [])
    c.index.start()
    s = requests.Session()
    for k in keys:
        assert s.get(c.url(k)).content == k.encode()


# Two index servers on one -db (a rolling restart: start the new one, then stop the old one;
# SO_REUSEPORT lets both bind the port). The new server's start-up recovery takes every PENDING
# record for a crash leftover, including the old server's writes still in flight, and drops
# them. The key is then free: another client's PUT is acknowledged, and when the old upload
# ends nginx renames its bytes over the acknowledged file (the old server only gets a failed
# compare-and-set, answers 500, and deletes nothing).
def test_second_server_on_the_same_db_does_not_break_writes_in_flight(make_cluster):
    from test_faults import wait_locked, wait_until

    c = make_cluster(volumes=3, replicas=2, workers=1)
    key = f"/rolling/{uuid.uuid4().hex}"
    old = os.urandom(2 << 20)
    s = faults.socket.create_connection((faults.HOST, c.port))
    s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(old)}\r\n\r\n".encode() + old[:1 << 20])
    wait_locked(c, key)
    assert requests.put(c.url(key), data=b"x").status_code == 409  # in flight
    second = c._index(1, [])
    second.log = c.root / "second.log"
    second.start(wait=False)
    try:
        # the second server waits for the first one's lock on -db instead of taking its writes
        # (it says so before any start-up recovery: the lock comes first)
        wait_until(lambda: "another minikv server holds" in second.log.read_text(), timeout=20,
                   what="the second server waiting for the lock")
        assert requests.put(c.url(key), data=b"new").status_code == 409  # still the first one's
        s.sendall(old[1 << 20:])  # the first upload ends
        s.settimeout(10)
        assert s.recv(1000).startswith(b"HTTP/1.1 201 ")
        assert requests.get(c.url(key)).content == old
    finally:
        s.close()
        second.stop()


# A PUT whose body arrived faster than the handler took it (more than BODY_HIGH buffered, so
# reading from the client paused) and that then fails (a volume died: 503) is answered, and the
# keep-alive connection is kept, but reading from it stays paused: the "body" pause is only
# lifted by Body.read() or by the discard path of Connection._respond, neither of which runs
# when the whole body had already arrived. The client's next request on that connection is
# never read and it waits until its own timeout (seen as 30 s hangs of small PUTs right after a
# volume's kill -9 in bench/faults.py volume-kill9).
def test_connection_reads_on_after_a_failed_put_with_a_buffered_body():
    import asyncio

    from test_fuzz import FakeTransport

    from minikv.http.response import HTTPError, response
    from minikv.http.server import BODY_HIGH, Connection, Limits

    class VolumeDiesApp:
        def handle(self, req):
            if req.method == b"GET":
                return response(200, [], b"ok")
            return self.put(req)

        async def put(self, req):
            await req.body.read()  # a first chunk goes out to the replicas, then one of them dies
            raise HTTPError(503, "volume v is unreachable; nothing was stored")

    loop = asyncio.new_event_loop()
    conn = Connection(VolumeDiesApp(), Limits(), loop)
    t = FakeTransport()
    conn.connection_made(t)
    size = 2 * BODY_HIGH
    conn.data_received(b"PUT /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // 65536):  # the client sends fast: all of it is buffered
        conn.data_received(b"x" * 65536)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert bytes(t.out).startswith(b"HTTP/1.1 503 ")
    assert t.closed or not t.paused, "connection kept alive but no longer read: the next request hangs"
