"""Fault injection: does any acknowledged write get lost when things break?

Runs a mixed load (writers, readers, deleters; values from a few bytes to several MB) against a
real local cluster (nginx volumes + index, tests/cluster.py) and injects one fault at a time:

    volume-kill9     kill -9 of a volume (its `minikv volume` and nginx), restart
    volume-sigstop   SIGSTOP of a volume for longer than every timeout (hung, not dead), SIGCONT
    worker-kill9     kill -9 of the index worker that holds an upload in flight
    index-kill9      kill -9 of the whole index mid-upload, restart
    volume-readonly  a volume's directories made read-only, then writable again
    volume-full      a volume on a small tmpfs filled up, then space freed (root only)
    net-lossy        volumes on their own hosts (ip netns), links with latency and loss
    net-cut          the same, one host cut off entirely (every packet dropped), then back

After each fault is removed and the cluster settles, the clients' ledger is checked against the
cluster: every PUT answered 201 reads back (through the index's redirect) with exactly its md5,
and every replica its record names holds those bytes on disk; every key DELETEd with 204 is gone
(404, not listed, no file); no record is left PENDING (a key stuck at 409); no key is listed or
redirected without being acknowledged (phantom); a PUT answered 5xx stored nothing and the key is
writable again; a request with no answer left the key absent or exactly as sent. Clients must
only see clear errors: every 5xx carries a reason, and no request hits the client's timeout.
`minikv repair` then `minikv verify` are run too when minikv/admin/verify.py exists.

The network faults put each volume in a network namespace of its own, linked to the host by a
pair of TUN devices and a relay process of this script (`_link`), which delays, drops or
blackholes packets: the kernel here has no netem qdisc, and a userspace link does the same job
(tc netem is used for nothing). Everything runs on loopback or in namespaces made here, which
are deleted at the end. Needs root for netns and tmpfs; those faults are skipped otherwise.

Bounded: every phase has a fixed length, every request a timeout, every scenario a cap on
operations; the whole default run takes about 3 minutes.

    .venv/bin/python bench/faults.py                    # every fault, print the table
    .venv/bin/python bench/faults.py volume-sigstop --json out.json
    .venv/bin/python bench/faults.py --quick            # shorter phases (what the tests run)

Exit status: 0 when every invariant held, 1 when one was broken (a lost write, a phantom...).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import HOST, Cluster, Proc  # noqa: E402

from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2path, key2volume  # noqa: E402

CLIENT_TIMEOUT = 30.0  # a request with no answer by then is a hang
STALL = 5.0  # the index's volume stall timeout (http/client.py STALL_MIN), what SIGSTOP must outlast
BIG = 4 << 20
_RANDOM = os.urandom(BIG + (64 << 10))  # values are slices of this, prefixed by their key


def log(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the clients' ledger


@dataclass
class Phase:
    """What the clients saw in one phase (before / fault / after) of a scenario."""

    puts: int = 0
    puts_ok: int = 0
    puts_5xx: int = 0
    puts_no_answer: int = 0
    gets: int = 0
    gets_failed: int = 0
    deletes: int = 0
    deletes_ok: int = 0
    deletes_5xx: int = 0
    errors_without_reason: int = 0
    unexpected: int = 0  # an answer the API never gives to that request
    hangs: int = 0  # no answer within CLIENT_TIMEOUT
    max_error_s: float = 0.0  # slowest 5xx: how long a client waited for a clear error
    max_s: float = 0.0


class Ledger:
    """What every client was told, shared by the load threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # 201, not deleted since: key -> md5
        self.acked_list: list[str] = []  # for random picks (entries may be stale)
        self.deleted: set[str] = set()  # 204
        self.failed: set[str] = set()  # PUT answered 5xx: nothing may be stored
        self.unsure: dict[str, str] = {}  # PUT without an answer: absent, or exactly this md5
        self.unlinked: dict[str, str] = {}  # DELETE answered 5xx: key unlinked, DELETE again
        self.delete_unsure: dict[str, str] = {}  # DELETE without an answer
        self.lost: list[str] = []  # seen during the run: an acknowledged key answered 404
        self.corrupt: list[str] = []  # seen during the run: wrong bytes for an acknowledged key
        self.phases: dict[str, Phase] = {}
        self.notes: list[str] = []
        self.errors: dict[str, int] = {}  # kind of 5xx -> how many

    def phase(self, name: str) -> Phase:
        return self.phases.setdefault(name, Phase())

    def add_acked(self, key: str, md5: str) -> None:
        with self.lock:
            self.acked[key] = md5
            self.acked_list.append(key)

    def take_for_delete(self, rnd: random.Random) -> tuple[str, str] | None:
        with self.lock:
            while self.acked_list:
                i = rnd.randrange(len(self.acked_list))
                key = self.acked_list[i]
                self.acked_list[i] = self.acked_list[-1]
                self.acked_list.pop()
                md5 = self.acked.pop(key, None)
                if md5 is not None:
                    return key, md5
        return None

    def pick(self, rnd: random.Random) -> tuple[str, str] | None:
        with self.lock:
            for _ in range(5):
                if not self.acked_list:
                    return None
                key = rnd.choice(self.acked_list)
                if key in self.acked:
                    return key, self.acked[key]
        return None


def value_for(key: str, size: int, rnd: random.Random) -> bytes:
    off = rnd.randrange(len(_RANDOM) - size) if size < len(_RANDOM) else 0
    return (key.encode() + b"\n" + _RANDOM[off:off + size])[:max(size, 1)]


class Load:
    """Writer, reader and deleter threads on one cluster until stop() (or max_ops in all).

    Each role has threads of its own, so a writer stuck on a hung volume does not stop the
    reads from being measured. `threads` is the number of writers; there are as many readers
    (pausing 5 ms between reads) and one deleter (20 ms between deletes)."""

    def __init__(self, url: str, prefix: str, threads: int = 2, big_share: float = 0.1,
                 big_size: int = BIG, max_ops: int = 50_000, seed: int = 1, pace: float = 0.0):
        self.url = url.rstrip("/")
        self.prefix = prefix
        self.threads = threads
        self.big_share = big_share
        self.big_size = big_size
        self.max_ops = max_ops
        self.seed = seed
        self.pace = pace  # seconds a writer waits between PUTs
        self.ledger = Ledger()
        self.phase = "before"
        self.ops = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Load:
        roles = ["put"] * self.threads + ["get"] * self.threads + ["delete"]
        for i, role in enumerate(roles):
            t = threading.Thread(target=self._run, args=(i, role), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT + 10)

    def _run(self, i: int, role: str) -> None:
        rnd = random.Random(self.seed * 1000 + i)
        s = requests.Session()
        while not self._stop.is_set() and self.ops < self.max_ops:
            self.ops += 1
            try:
                if role == "put":
                    self.put(s, rnd)
                    if self.pace:
                        time.sleep(self.pace)
                elif len(self.ledger.acked) < 20:
                    time.sleep(0.05)
                elif role == "get":
                    self.get(s, rnd)
                    time.sleep(0.005)
                else:
                    self.delete(s, rnd)
                    time.sleep(0.02)
            except Exception as e:  # noqa: BLE001 - a driver bug must show, not stop the run
                self.ledger.notes.append(f"driver error: {e!r}")
                time.sleep(0.1)

    def _key(self) -> str:
        return f"/{self.prefix}/{uuid.uuid4().hex}"

    def _timed(self, s: requests.Session, method: str, url: str, **kw):
        """(response or None, seconds, what happened when there is no response)."""
        t0 = time.monotonic()
        try:
            r = s.request(method, url, timeout=(5, CLIENT_TIMEOUT), allow_redirects=False, **kw)
            return r, time.monotonic() - t0, ""
        except requests.Timeout:
            return None, time.monotonic() - t0, "timeout"
        except requests.RequestException as e:
            s.close()  # the pooled connection may be to a dead worker
            took = time.monotonic() - t0
            time.sleep(0.05)  # a client backs off a little before its next try
            return None, took, type(e).__name__

    def _account(self, p: Phase, r, took: float, why: str, method: str) -> None:
        p.max_s = max(p.max_s, took)
        if why == "timeout":
            p.hangs += 1
        if r is not None and r.status_code >= 500:
            p.max_error_s = max(p.max_error_s, took)
            if not r.text.strip():
                p.errors_without_reason += 1
            # one example of each kind of error, for the report (digits and hex blurred)
            kind = f"{self.phase}: {method} {r.status_code} " + re.sub(r"[0-9a-f]{6,}|\d+", "N", r.text.strip())[:160]
            with self.ledger.lock:
                self.ledger.errors[kind] = self.ledger.errors.get(kind, 0) + 1

    def put(self, s: requests.Session, rnd: random.Random) -> None:
        key = self._key()
        size = rnd.randrange(self.big_size // 4, self.big_size) if rnd.random() < self.big_share \
            else rnd.randrange(1, 64 << 10)
        data = value_for(key, size, rnd)
        md5 = hashlib.md5(data).hexdigest()
        p = self.ledger.phase(self.phase)
        r, took, why = self._timed(s, "PUT", self.url + key, data=data)
        p.puts += 1
        self._account(p, r, took, why, "PUT")
        if r is None:
            p.puts_no_answer += 1
            with self.ledger.lock:
                self.ledger.unsure[key] = md5
        elif r.status_code == 201:
            p.puts_ok += 1
            self.ledger.add_acked(key, md5)
        elif r.status_code >= 500:
            p.puts_5xx += 1
            with self.ledger.lock:
                self.ledger.failed.add(key)
        else:
            p.unexpected += 1
            self.ledger.notes.append(f"PUT {key}: {r.status_code} {r.text.strip()[:200]}")
            with self.ledger.lock:
                self.ledger.unsure[key] = md5

    def get(self, s: requests.Session, rnd: random.Random) -> None:
        picked = self.ledger.pick(rnd)
        if picked is None:
            return
        key, md5 = picked
        p = self.ledger.phase(self.phase)
        p.gets += 1
        r, took, why = self._timed(s, "GET", self.url + key)
        self._account(p, r, took, why, "GET")
        if r is None or r.status_code != 302:
            if r is not None and r.status_code == 404:
                if key not in self.ledger.acked:
                    p.gets -= 1  # a deleter took it meanwhile: not a read of an acknowledged key
                    return
                self.ledger.lost.append(f"{key}: GET answered 404 during the run")
            p.gets_failed += 1
            return
        try:  # a reader gives up on a replica that does not answer (a hung volume) after 3 s
            got = s.get(r.headers["Location"], timeout=(2, 3))
        except requests.RequestException:
            p.gets_failed += 1
            s.close()
            return
        if got.status_code == 200 and hashlib.md5(got.content).hexdigest() == md5:
            return
        if key not in self.ledger.acked:
            p.gets -= 1  # deleted between the redirect and the read
            return
        p.gets_failed += 1
        if got.status_code == 200:
            self.ledger.corrupt.append(f"{key}: read {len(got.content)} bytes with another md5")

    def delete(self, s: requests.Session, rnd: random.Random) -> None:
        taken = self.ledger.take_for_delete(rnd)
        if taken is None:
            return
        key, md5 = taken
        p = self.ledger.phase(self.phase)
        p.deletes += 1
        r, took, why = self._timed(s, "DELETE", self.url + key)
        self._account(p, r, took, why, "DELETE")
        with self.ledger.lock:
            if r is None:
                self.ledger.delete_unsure[key] = md5
            elif r.status_code == 204:
                p.deletes_ok += 1
                self.ledger.deleted.add(key)
            elif r.status_code == 404:
                self.ledger.lost.append(f"{key}: DELETE answered 404 (the acknowledged key was gone)")
            elif r.status_code >= 500:
                p.deletes_5xx += 1
                self.ledger.unlinked[key] = md5
            else:
                p.unexpected += 1
                self.ledger.notes.append(f"DELETE {key}: {r.status_code} {r.text.strip()[:200]}")
                self.ledger.delete_unsure[key] = md5


# ---------------------------------------------------------------- checking the cluster


@dataclass
class Violations:
    lost: list[str] = field(default_factory=list)  # acknowledged, not readable with its bytes
    bad_replicas: list[str] = field(default_factory=list)  # a named replica missing or wrong
    resurrected: list[str] = field(default_factory=list)  # deleted with 204, back
    stuck: list[str] = field(default_factory=list)  # PENDING record left / 409 at rest
    phantoms: list[str] = field(default_factory=list)  # listed or redirected, never acknowledged
    stored_after_5xx: list[str] = field(default_factory=list)  # PUT said 5xx, key readable
    not_writable: list[str] = field(default_factory=list)  # a failed key refused a new PUT
    undeletable: list[str] = field(default_factory=list)  # an unlinked key refused DELETE after the fault
    admin: list[str] = field(default_factory=list)  # repair/verify complaints
    orphans: int = 0  # files without a record (not an error: `gc` material)

    def count(self) -> int:
        return sum(len(v) for k, v in asdict(self).items() if isinstance(v, list))


class Checker:
    def __init__(self, cluster: Cluster, ledger: Ledger, prefix: str):
        self.c = cluster
        self.ledger = ledger
        self.prefix = prefix
        self._local = threading.local()
        self.v = Violations()

    def url(self, key: str) -> str:
        return self.c.url(key)

    def files(self, key: str) -> list[Path]:
        """Every file of `key` on any volume, wherever placement could have put it."""
        k = key.encode()
        found = []
        for v in key2volume(k, self.c.names, len(self.c.names), self.c.subvolumes):
            p = Path(str(self.c.volume_dir(v)) + key2path(k))
            if p.exists():
                found.append(p)
        return found

    def read_back(self, key: str) -> tuple[int, str | None, list[str]]:
        """(status of GET through the index, md5 of the bytes it redirects to, Key-Volumes)."""
        r = self.s.get(self.url(key), allow_redirects=False, timeout=CLIENT_TIMEOUT)
        if r.status_code != 302:
            return r.status_code, None, []
        try:
            body = self.s.get(r.headers["Location"], timeout=CLIENT_TIMEOUT).content
        except requests.RequestException as e:
            return 302, f"unreadable: {e}", r.headers.get("Key-Volumes", "").split(",")
        return 302, hashlib.md5(body).hexdigest(), r.headers.get("Key-Volumes", "").split(",")

    def replicas_ok(self, key: str, md5: str, volumes: list[str]) -> None:
        k = key.encode()
        for v in volumes:
            p = Path(str(self.c.volume_dir(v)) + key2path(k))
            try:
                got = hashlib.md5(p.read_bytes()).hexdigest()
            except OSError as e:
                self.v.bad_replicas.append(f"{key} on {v}: {e.strerror}")
                continue
            if got != md5:
                self.v.bad_replicas.append(f"{key} on {v}: md5 {got}, acknowledged {md5}")

    def listed(self, what: str) -> set[str]:
        keys, start = set(), ""
        while True:
            r = self.s.get(self.url(f"/{self.prefix}/?{what}&limit=1000&start={quote(start)}"),
                           timeout=CLIENT_TIMEOUT)
            r.raise_for_status()
            page = r.json()
            keys.update(page["keys"])
            if not page["next"]:
                return keys
            start = page["next"]

    def writable(self, key: str) -> None:
        """A key the clients do not own any more must take a PUT (not 409/403), then go."""
        r = self.s.put(self.url(key), data=b"probe", timeout=CLIENT_TIMEOUT)
        if r.status_code >= 500:  # the volume still refuses (a full disk): not the key's fault
            self.ledger.notes.append(f"probe PUT {key}: {r.status_code} {r.text.strip()[:100]}")
            return
        if r.status_code != 201:
            self.v.not_writable.append(f"{key}: PUT answered {r.status_code} {r.text.strip()[:120]}")
            return
        r = self.s.delete(self.url(key), timeout=CLIENT_TIMEOUT)
        if r.status_code != 204:
            self.v.not_writable.append(f"{key}: DELETE of the probe answered {r.status_code}")

    @property
    def s(self) -> requests.Session:
        """A session per checking thread."""
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def run(self) -> Violations:
        led, v = self.ledger, self.v
        with _ro_store(self.c) as store:
            v.stuck += [f"{k.decode(errors='replace')}: PENDING record at rest" for k, _ in store.pending_records()]
        self.listed_keys, self.unlinked_keys = self.listed("list"), self.listed("unlinked")
        with ThreadPoolExecutor(8) as ex:
            for check, items in ((self.check_deleted, [(k, "") for k in led.deleted]),
                                 (self.check_failed, [(k, "") for k in led.failed]),
                                 (self.check_unsure, led.unsure.items()),
                                 (self.check_acked, led.acked.items()),
                                 (self.check_delete_again, [*led.unlinked.items(), *led.delete_unsure.items()])):
                list(ex.map(lambda kv, check=check: check(*kv), list(items)))
        v.lost += led.lost + led.corrupt
        # phantoms: listed without any client having been told it is stored
        known = set(led.acked) | set(led.unsure) | set(led.unlinked) | set(led.delete_unsure)
        for key in self.listed_keys - known:
            v.phantoms.append(f"{key}: listed, never acknowledged")
        for key in self.unlinked_keys - set(led.unlinked) - set(led.delete_unsure):
            v.phantoms.append(f"{key}: listed as unlinked, never deleted")
        self.admin()
        return v

    def check_deleted(self, key: str, _md5: str) -> None:
        """DELETE said 204: gone for good, files included."""
        code, _, _ = self.read_back(key)
        if code != 404 or key in self.listed_keys or key in self.unlinked_keys:
            self.v.resurrected.append(f"{key}: GET {code}, listed={key in self.listed_keys}")
        if self.files(key):
            self.v.resurrected.append(f"{key}: files still on disk: {self.files(key)}")

    def check_failed(self, key: str, _md5: str) -> None:
        """PUT said 5xx: nothing stored, and the key takes a new PUT."""
        code, _, _ = self.read_back(key)
        if code != 404 or key in self.listed_keys:
            self.v.stored_after_5xx.append(f"{key}: GET {code} after a 5xx PUT")
            return
        self.v.orphans += len(self.files(key))
        self.writable(key)

    def check_unsure(self, key: str, md5: str) -> None:
        """PUT had no answer: absent (and writable), or stored whole."""
        code, got, volumes = self.read_back(key)
        if code == 302:
            if got != md5:
                self.v.phantoms.append(f"{key}: unanswered PUT reads back with md5 {got}, sent {md5}")
            else:
                self.replicas_ok(key, md5, volumes)
        elif code == 404:
            self.v.orphans += len(self.files(key))
            self.writable(key)
        else:
            self.v.stuck.append(f"{key}: GET {code} after an unanswered PUT")

    def check_acked(self, key: str, md5: str) -> None:
        """PUT said 201: readable with exactly its bytes, listed, every replica right."""
        code, got, volumes = self.read_back(key)
        if code != 302 or got != md5:
            self.v.lost.append(f"{key}: GET {code}, md5 {got}, acknowledged {md5}")
            return
        self.replicas_ok(key, md5, volumes)
        if key not in self.listed_keys:
            self.v.lost.append(f"{key}: readable but not listed")

    def check_delete_again(self, key: str, md5: str) -> None:
        """DELETE said 5xx (the key is unlinked) or had no answer: DELETE again works."""
        code, got, _ = self.read_back(key)
        if code == 302 and got != md5:
            self.v.lost.append(f"{key}: being deleted, reads back with md5 {got}")
        if key in self.ledger.unlinked and code != 404:
            self.v.resurrected.append(f"{key}: DELETE answered 5xx (unlinked) but GET answers {code}")
        r = self.s.delete(self.url(key), timeout=CLIENT_TIMEOUT)
        if r.status_code not in (204, 404):
            self.v.undeletable.append(f"{key}: DELETE after the fault answered {r.status_code} "
                                      f"{r.text.strip()[:120]}")
        elif self.files(key):
            self.v.undeletable.append(f"{key}: DELETE answered {r.status_code}, files remain")

    def admin(self) -> None:
        """repair, then verify must be clean (only when the admin commands exist)."""
        if not (ROOT / "minikv" / "admin" / "verify.py").exists():
            return
        flags = ["-volumes", ",".join(self.c.names), "-db", str(self.c.root / "index"),
                 "-replicas", str(self.c.replicas), "-subvolumes", str(self.c.subvolumes)]
        # orphans (files of PUTs that failed while their volume could not be cleaned) go too
        for cmd in (["repair", "-delete-orphans"], ["verify"]):
            out = subprocess.run([sys.executable, "-m", "minikv", *flags, *cmd], capture_output=True,
                                 text=True, timeout=300, cwd=ROOT)
            if out.returncode != 0 and cmd == ["verify"]:
                tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
                self.v.admin.append(f"verify after repair exited {out.returncode}: {' | '.join(tail)}")


class _ro_store:
    """The index opened read-only beside the running server (LMDB allows it)."""

    def __init__(self, c: Cluster):
        self.path = str(c.root / "index")

    def __enter__(self) -> Store:
        self.store = Store(self.path, readonly=True)
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


# ---------------------------------------------------------------- process helpers


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it holds no sockets any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_index(c: Cluster) -> None:
    """kill -9 of the whole index, and wait until its workers are really gone: a dying
    worker's SO_REUSEPORT socket would otherwise still take (and reset) new connections."""
    workers = children(c.index.proc.pid)
    c.index.stop(signal.SIGKILL)
    wait_for(lambda: all(gone(p) for p in workers), 10, 0.02)


def holder_of_connection(pids: list[int], port: int, client_port: int) -> int | None:
    """The process among `pids` that holds the server side of the TCP connection
    127.0.0.1:client_port -> :port (read from /proc: no tools needed)."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, remote = parts[1], parts[2]
            if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
                inode = parts[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def slow_upload(port: int, key: str, length: int = 16 << 20, sent: int = 2 << 20) -> socket.socket:
    """A PUT that announces `length` bytes and sends `sent`: an upload in flight, on purpose."""
    s = socket.create_connection((HOST, port), timeout=5)
    s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
    s.sendall(_RANDOM[:sent])
    return s


def hold_key(c: Cluster, key: str) -> socket.socket:
    """A slow upload of `key`, once the index took the key for it (its record is PENDING): a
    kill sooner, before the worker read the request's head, would find nothing in flight.
    A DELETE finds out (409 while locked, 404 before, and it changes nothing)."""
    sock = slow_upload(c.port, key)
    if wait_for(lambda: requests.delete(c.url(key), timeout=5).status_code == 409, 10, 0.05) is None:
        sock.close()
        raise RuntimeError(f"the index did not take {key} for the slow upload within 10s")
    return sock


def wait_for(check, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until check() is true, None if it never was within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if check():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - "not yet"
            pass
        time.sleep(step)
    return None


# ---------------------------------------------------------------- network hosts (netns + TUN link)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def can_use_netns() -> str:
    """'' when network namespaces and TUN devices can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs `ip` (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return ""


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def link_main(name: str, ns: str, local: str, remote: str) -> int:
    """`faults.py _link`: a point-to-point link between this host (tun `<name>h`, address
    `local`) and namespace `ns` (tun `<name>n`, address `remote`), relayed by this process.
    Commands on stdin, one per line: `delay SECONDS`, `loss FRACTION`, `cut`, `heal`. The
    devices vanish with the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    host_fd = _open_tun(name + "h")
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    theirs = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if libc.setns(theirs, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into " + ns)
    ns_fd = _open_tun(name + "n")
    libc.setns(own, CLONE_NEWNET)
    sh = subprocess.run
    sh(["ip", "addr", "add", local, "peer", remote + "/32", "dev", name + "h"], check=True)
    sh(["ip", "link", "set", name + "h", "up"], check=True)
    nsx = ["ip", "netns", "exec", ns]
    sh([*nsx, "ip", "addr", "add", remote, "peer", local + "/32", "dev", name + "n"], check=True)
    sh([*nsx, "ip", "link", "set", name + "n", "up"], check=True)
    sh([*nsx, "ip", "link", "set", "lo", "up"], check=True)
    state = {"delay": 0.0, "loss": 0.0, "cut": False}
    rnd = random.Random()
    loop = asyncio.new_event_loop()

    def relay(src: int, dst: int) -> None:
        for _ in range(64):  # a burst per wake-up
            try:
                pkt = os.read(src, 65536)
            except BlockingIOError:
                return
            if state["cut"] or (state["loss"] and rnd.random() < state["loss"]):
                continue
            if state["delay"]:
                loop.call_later(state["delay"], _write, dst, pkt)
            else:
                _write(dst, pkt)

    def command() -> None:
        line = sys.stdin.readline()
        if not line:
            loop.stop()
            return
        word, _, arg = line.strip().partition(" ")
        if word in ("delay", "loss"):
            state[word] = float(arg)
        elif word in ("cut", "heal"):
            state["cut"] = word == "cut"
        print(f"ok {line.strip()}", flush=True)

    loop.add_reader(host_fd, relay, host_fd, ns_fd)
    loop.add_reader(ns_fd, relay, ns_fd, host_fd)
    loop.add_reader(sys.stdin.fileno(), command)
    print("ready", flush=True)
    loop.run_forever()
    return 0


def _write(fd: int, pkt: bytes) -> None:
    try:
        os.write(fd, pkt)
    except OSError:
        pass  # a full tun queue drops the packet, as a real link would


class Link:
    """A relay process of ours and the namespace behind it."""

    def __init__(self, tag: str, i: int, subnet: int):
        self.ns = f"mkv{tag}{i}"
        self.name = f"mk{tag}{i}"  # + h / n: at most 15 characters
        self.local = f"10.231.{subnet}.{4 * i + 1}"
        self.remote = f"10.231.{subnet}.{4 * i + 2}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_link", self.name, self.ns, self.local, self.remote],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"link {self.name} did not come up")

    def set(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own relay, by its pid
            self.proc.wait(5)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class NsProc(Proc):
    """A `minikv volume` inside a network namespace, listening on that host's address."""

    def __init__(self, args: list[str], port: int, log: Path, ns: str, addr: str):
        super().__init__(args, port, log)
        self.ns, self.addr = ns, addr

    def start(self, wait: bool = True) -> NsProc:
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "minikv", *self.args],
                                     stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=ROOT)
        if wait:
            self.wait()
        return self

    def wait(self, timeout: float = 15.0) -> None:
        ok = wait_for(lambda: socket.create_connection((self.addr, self.port), timeout=0.5).close() or True,
                      timeout)
        if ok is None:
            raise TimeoutError(f"volume {self.addr}:{self.port} in {self.ns} did not open")


# ---------------------------------------------------------------- clusters


class FaultCluster(Cluster):
    """tests/cluster.py's cluster, plus what the faults need: the on-disk directory of a
    volume by name, volumes in network namespaces, a small filesystem under one volume."""

    def __init__(self, root: Path, volumes: int = 4, replicas: int = 3, subvolumes: int = 10, workers: int = 2,
                 links: list[Link] | None = None, tmpfs_mb: int = 0):
        super().__init__(root, volumes=volumes, replicas=replicas, subvolumes=subvolumes, workers=workers)
        self.workers = workers
        self.links = links or []
        self.mounts: list[Path] = []
        for i, link in enumerate(self.links):
            port = self.volumes[i].port
            d = root / f"vol{i}"
            self.volumes[i] = NsProc(["volume", "-host", link.remote, "-port", str(port), str(d)], port,
                                     root / f"vol{i}.log", link.ns, link.remote)
            self.names[i] = f"{link.remote}:{port}"
        if self.links:
            self.index = self._index(workers, [])
        if tmpfs_mb:
            d = root / "vol0"
            d.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mb}m,mode=0755", "tmpfs", str(d)], check=True)
            self.mounts.append(d)

    def start(self) -> FaultCluster:
        for v in self.volumes:
            v.start(wait=False)
        for v in self.volumes:
            if isinstance(v, NsProc):
                v.wait()
            else:
                from cluster import wait_port

                wait_port(v.port, v.proc)
        self.index.start()
        return self

    def volume_dir(self, name: str) -> Path:
        host, _, sub = name.partition("/")
        vol = self.volumes[self.names.index(host)]
        return Path(vol.args[-1]) / sub if sub else Path(vol.args[-1])

    def restart_volume(self, i: int) -> None:
        self.volumes[i].start()

    def start_index(self) -> None:
        self.index = self._index(self.workers, [])
        self.index.start()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for d in self.mounts:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)
            for link in self.links:
                link.close()


# ---------------------------------------------------------------- the faults


@dataclass
class Timing:
    warm: float = 2.0  # load before the fault
    fault: float = 5.0  # load during it
    after: float = 3.0  # load after it was removed
    sigstop: float = STALL + 3.0  # hung for longer than every timeout


QUICK = Timing(warm=1.0, fault=2.5, after=1.5, sigstop=STALL + 1.5)


@dataclass
class Result:
    fault: str
    what: str
    acked: int = 0  # writes answered 201, whole scenario
    acked_during: int = 0  # of them, while the fault was on
    lost: int = 0
    reads_during: int = 0
    reads_failed_during: int = 0
    recover_s: float | None = None
    violations: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        v = self.violations
        broken = sum(len(x) for x in v.values() if isinstance(x, list))
        hangs = sum(p["hangs"] for p in self.phases.values())
        noreason = sum(p["errors_without_reason"] for p in self.phases.values())
        return broken == 0 and hangs == 0 and noreason == 0 and self.recover_s is not None


class Scenario:
    """One fault: inject() and heal() around a window of load, then the checks."""

    name = ""
    what = ""
    needs = ""  # "netns" / "root": skipped when the machine cannot

    def __init__(self, timing: Timing, threads: int, big: int, pace: float = 0.0):
        self.t = timing
        self.threads = threads
        self.big = big
        self.pace = pace

    def cluster(self, root: Path) -> FaultCluster:
        return FaultCluster(root)

    def before_load(self, c: FaultCluster) -> None:
        """Anything the fault needs set up before the load starts (nothing by default)."""

    def inject(self, c: FaultCluster, load: Load) -> None:
        raise NotImplementedError

    def heal(self, c: FaultCluster) -> None:
        raise NotImplementedError

    def fault_seconds(self) -> float:
        return self.t.fault

    def recovered(self, c: FaultCluster) -> bool:
        """A fresh write placed on every volume, and its read, work."""
        key = f"/probe/{uuid.uuid4().hex}"
        r = requests.put(c.url(key), data=b"probe", timeout=CLIENT_TIMEOUT)
        if r.status_code != 201:
            return False
        r = requests.get(c.url(key), timeout=CLIENT_TIMEOUT)
        requests.delete(c.url(key), timeout=CLIENT_TIMEOUT)
        return r.content == b"probe"

    def run(self, root: Path) -> Result:
        t0 = time.monotonic()
        res = Result(self.name, self.what)
        c = self.cluster(root)
        try:
            c.start()
            wait_for(lambda: self.recovered(c), 10)
            self.before_load(c)
            load = Load(c.url("/"), "k", threads=self.threads, big_size=self.big,
                        seed=zlib_seed(self.name), pace=self.pace).start()
            time.sleep(self.t.warm)
            load.phase = "fault"
            log(f"{self.name}: inject")
            self.inject(c, load)
            time.sleep(self.fault_seconds())
            log(f"{self.name}: heal")
            healed = time.monotonic()
            self.heal(c)
            load.phase = "after"
            ok = wait_for(lambda: self.recovered(c), 60)
            res.recover_s = None if ok is None else round(time.monotonic() - healed, 2)
            time.sleep(self.t.after)
            load.stop()
            time.sleep(0.6)  # every worker's health probe sees the volumes up again
            log(f"{self.name}: checking {len(load.ledger.acked)} acknowledged keys")
            v = Checker(c, load.ledger, "k").run()
            led = load.ledger
            res.violations = asdict(v)
            res.lost = len(v.lost)
            res.phases = {k: asdict(p) for k, p in led.phases.items()}
            res.acked = sum(p.puts_ok for p in led.phases.values())
            during = led.phases.get("fault", Phase())
            res.acked_during = during.puts_ok
            res.reads_during = during.gets
            res.reads_failed_during = during.gets_failed
            res.notes = led.notes[:20]
            res.errors = dict(sorted(led.errors.items(), key=lambda kv: -kv[1])[:15])
        finally:
            c.stop()
            res.seconds = round(time.monotonic() - t0, 1)
        return res


def zlib_seed(name: str) -> int:
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16)


class VolumeKill9(Scenario):
    name = "volume-kill9"
    what = "kill -9 of a volume (minikv volume + nginx), restart"

    def inject(self, c, load):
        c.volumes[0].stop(signal.SIGKILL)

    def heal(self, c):
        c.restart_volume(0)


class VolumeSigstop(Scenario):
    name = "volume-sigstop"
    what = f"SIGSTOP of a volume for longer than the {STALL:g} s stall timeout, SIGCONT"

    def fault_seconds(self):
        return self.t.sigstop

    def inject(self, c, load):
        c.volumes[0].send(signal.SIGSTOP)

    def heal(self, c):
        c.volumes[0].send(signal.SIGCONT)


class WorkerKill9(Scenario):
    name = "worker-kill9"
    what = "kill -9 of the index worker holding an upload in flight (supervisor restarts it)"

    def inject(self, c, load):
        key = f"/k/{uuid.uuid4().hex}"
        with load.ledger.lock:
            load.ledger.failed.add(key)  # never finished: must leave nothing
        self.sock = hold_key(c, key)
        pid = holder_of_connection(children(c.index.proc.pid), c.port, self.sock.getsockname()[1])
        if pid is None:  # it holds the key, so it accepted the connection: this is a bug here
            raise RuntimeError("no worker found holding the slow upload")
        os.kill(pid, signal.SIGKILL)  # a child of the supervisor we started

    def heal(self, c):
        self.sock.close()


class IndexKill9(Scenario):
    name = "index-kill9"
    what = "kill -9 of the whole index (supervisor + workers) mid-upload, restart"

    def inject(self, c, load):
        key = f"/k/{uuid.uuid4().hex}"
        with load.ledger.lock:
            load.ledger.failed.add(key)
        self.sock = hold_key(c, key)
        kill_index(c)

    def fault_seconds(self):
        return min(self.t.fault, 2.0)

    def heal(self, c):
        self.sock.close()
        c.start_index()


class VolumeReadonly(Scenario):
    name = "volume-readonly"
    what = "a volume's directories made read-only (writes refused by the disk), then writable"

    def inject(self, c, load):
        self.modes = {}
        top = c.volume_dir(c.names[0])
        for d, dirs, _ in os.walk(top):
            if d == str(top):
                dirs[:] = [x for x in dirs if x != ".nginx"]
            mode = os.stat(d).st_mode & 0o7777
            self.modes[d] = mode
            os.chmod(d, mode & ~0o222)

    def heal(self, c):
        for d, mode in self.modes.items():
            os.chmod(d, mode)


class VolumeFull(Scenario):
    name = "volume-full"
    what = "a volume on a small tmpfs (256 MB; 64 MB with --quick) filled to its last 256 KB, then space freed"
    needs = "root"

    def cluster(self, root):
        return FaultCluster(root, tmpfs_mb=256 if self.big > (1 << 20) else 64)

    def before_load(self, c):
        # Some space is taken now, before the load runs: a fast load can fill the small tmpfs
        # on its own before inject(), and heal() must always have something to give back.
        self.ballast = c.volume_dir(c.names[0]) / "ballast.fill"
        with open(self.ballast, "wb") as f:
            f.write(_RANDOM[:1 << 20] * 8)

    def inject(self, c, load):
        # Deletes of the load free space while the fault is on: the ballast is topped up until
        # heal(), or a few small PUTs fit again and the fault may never bite.
        self.healed = threading.Event()
        self.filler = threading.Thread(target=self._fill, daemon=True)
        self._top_up()
        self.filler.start()

    def _top_up(self):
        st = os.statvfs(self.ballast.parent)
        left = st.f_bavail * st.f_frsize - (256 << 10)
        with open(self.ballast, "ab") as f:
            try:
                while left > 0:  # the load writes too: it may fill up first
                    n = min(left, 1 << 20)
                    f.write(_RANDOM[:n])
                    left -= n
            except OSError:
                pass

    def _fill(self):
        while not self.healed.wait(0.05):
            self._top_up()

    def heal(self, c):
        self.healed.set()
        self.filler.join()
        self.ballast.unlink()
        st = os.statvfs(self.ballast.parent)
        log(f"{self.name}: {st.f_bavail * st.f_frsize >> 20} MB free after deleting the ballast")


class NetLossy(Scenario):
    name = "net-lossy"
    what = "each volume on its own host (netns); links get 20 ms each way and 2% packet loss"
    needs = "netns"
    delay, loss = 0.020, 0.02

    def cluster(self, root):
        tag = uuid.uuid4().hex[:4]
        subnet = random.randrange(1, 250)
        self.links = []
        try:
            for i in range(4):
                self.links.append(Link(tag, i, subnet))
        except BaseException:
            for link in self.links:
                link.close()
            raise
        return FaultCluster(root, links=self.links)

    def inject(self, c, load):
        for link in self.links:
            link.set(f"delay {self.delay}")
            link.set(f"loss {self.loss}")

    def heal(self, c):
        for link in self.links:
            link.set("delay 0")
            link.set("loss 0")


class NetCut(NetLossy):
    name = "net-cut"
    what = "each volume on its own host (netns); one host cut off (every packet dropped), then back"

    def fault_seconds(self):
        return self.t.sigstop  # past the stall timeout, as a hung volume

    def inject(self, c, load):
        self.links[0].set("cut")

    def heal(self, c):
        self.links[0].set("heal")


SCENARIOS: list[type[Scenario]] = [VolumeKill9, VolumeSigstop, WorkerKill9, IndexKill9, VolumeReadonly, VolumeFull,
                                   NetLossy, NetCut]


def skip_reason(cls: type[Scenario]) -> str:
    if cls.needs == "netns":
        return can_use_netns()
    if cls.needs == "root" and os.geteuid() != 0:
        return "needs root (mount)"
    return ""


def run(names: list[str], timing: Timing, threads: int = 2, big: int = BIG) -> list[Result]:
    results = []
    base = Path(tempfile.mkdtemp(prefix="minikv-faults-"))
    base.chmod(0o755)  # nginx workers (www-data under root) must reach the volumes
    try:
        for cls in SCENARIOS:
            if names and cls.name not in names:
                continue
            why = skip_reason(cls)
            if why:
                log(f"{cls.name}: skipped ({why})")
                continue
            res = cls(timing, threads, big).run(base / cls.name)
            log(f"{cls.name}: {'ok' if res.ok else 'BROKEN'} in {res.seconds}s")
            results.append(res)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    rows = ["| fault | writes acknowledged (during the fault) | writes lost | reads failed during the fault "
            "| time to recover | slowest 5xx | hangs | other violations |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        slowest = max((p["max_error_s"] for p in r.phases.values()), default=0)
        hangs = sum(p["hangs"] for p in r.phases.values())
        others = {k: len(v) for k, v in r.violations.items() if isinstance(v, list) and v and k != "lost"}
        noreason = sum(p["errors_without_reason"] for p in r.phases.values())
        if noreason:
            others["5xx without a reason"] = noreason
        rec = "never" if r.recover_s is None else f"{r.recover_s:.1f} s"
        rows.append(f"| {r.fault} | {r.acked} ({r.acked_during}) | {r.lost} | {r.reads_failed_during} of "
                    f"{r.reads_during} | {rec} | {slowest:.1f} s | {hangs} | "
                    f"{', '.join(f'{k}: {n}' for k, n in others.items()) or 'none'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_link"]:
        return link_main(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("faults", nargs="*", help="which faults (default: all): " + ", ".join(c.name for c in SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="short phases, small values (what the tests run)")
    ap.add_argument("--threads", type=int, default=2, help="writers (as many readers, and one deleter)")
    ap.add_argument("--json", help="write every result as JSON here")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: finally stops what we started
    unknown = set(args.faults) - {c.name for c in SCENARIOS}
    if unknown:
        ap.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    timing, big = (QUICK, 1 << 20) if args.quick else (Timing(), BIG)
    results = run(args.faults, timing, args.threads, big)
    print(table(results))
    for r in results:
        for k, v in r.violations.items():
            if isinstance(v, list) and v:
                print(f"\n{r.fault} {k}:\n  " + "\n  ".join(v[:10]))
        if r.notes:
            print(f"\n{r.fault} notes:\n  " + "\n  ".join(r.notes))
        if r.errors:
            print(f"\n{r.fault} errors the clients saw:\n  " + "\n  ".join(f"{n} x {k}" for k, n in r.errors.items()))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
