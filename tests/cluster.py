"""Real clusters for the tests: nginx volume servers and index servers on loopback ports,
started as `python -m minikv ...` processes in their own process groups and stopped by group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HOST = "127.0.0.1"
_given: set[int] = set()
_opened: list[Path] = []


def free_port() -> int:
    """A port nothing listens on, never the same one twice in a test run: the kernel may hand a
    just-closed port out again, and two servers told the same port would pass for one."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


def open_dir() -> Path:
    """A new folder for a cluster's data. Not pytest's tmp_path: that sits below a 0700 folder,
    which nginx workers (www-data when the tests run as root) could not enter."""
    path = Path(tempfile.mkdtemp(prefix="minikv-test-"))
    path.chmod(0o755)
    _opened.append(path)
    return path


def remove_opened() -> None:
    """Remove every folder open_dir made in this run, also those of tests that failed or did not
    clean up after themselves, so that test runs do not fill /tmp."""
    while _opened:
        shutil.rmtree(_opened.pop(), ignore_errors=True)


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """Until nothing listens on `port` any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} still open after {timeout}s")


class Proc:
    """A minikv process in its own process group."""

    def __init__(self, args: list[str], port: int, log: Path):
        self.args = args
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, preexec=None) -> Proc:
        """`preexec`: run in the child before minikv starts (to set its limits, say)."""
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "minikv", *self.args], stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
        if wait:
            wait_port(self.port, self.proc)
        return self

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    @contextlib.contextmanager
    def held(self):
        """Stopped (SIGSTOP) for the block: connections are accepted and nothing is answered, as
        a hung host does; continued after it, whatever happens in it."""
        self.send(signal.SIGSTOP)
        try:
            yield self
        finally:
            self.send(signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:  # never started, or stopped already
            return
        self.send(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait(5)
        # whatever the group still holds (nginx workers after a kill -9 of their master)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.logfile.close()
        self.proc = None


class Cluster:
    def __init__(self, root: Path, volumes: int = 3, replicas: int = 3, subvolumes: int = 10,
                 workers: int = 2, flags: list[str] | None = None, volume_flags: list[str] | None = None,
                 db: str | None = None):
        self.root = root
        self.db = db or str(root / "index")  # a folder (LMDB) or a postgresql:// URL
        root.mkdir(parents=True, exist_ok=True)
        self.replicas = replicas
        self.subvolumes = subvolumes
        self.volumes = [
            Proc(["volume", "-host", HOST, "-port", str(p := free_port()), *(volume_flags or []),
                  str(root / f"vol{i}")], p, root / f"vol{i}.log")
            for i in range(volumes)
        ]
        self.names = [f"{HOST}:{v.port}" for v in self.volumes]
        self.port = free_port()
        self.index = self._index(workers, flags or [])
        self.session = requests.Session()

    def _index(self, workers: int, flags: list[str]) -> Proc:
        return Proc(["server", "-port", str(self.port), "-volumes", ",".join(self.names),
                     "-db", self.db, "-replicas", str(self.replicas),
                     "-subvolumes", str(self.subvolumes), "-workers", str(workers), *flags],
                    self.port, self.root / "index.log")

    def start(self) -> Cluster:
        for v in self.volumes:
            v.start(wait=False)
        for v in self.volumes:
            wait_port(v.port, v.proc)
        self.index.start()
        for proc in [*self.volumes, self.index]:  # a port that opened may be another's
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} on port {proc.port} exited with {proc.proc.returncode}")
        return self

    def restart_index(self, workers: int = 2, flags: list[str] | None = None, sig: int = signal.SIGTERM) -> None:
        self.index.stop(sig)
        wait_closed(self.port)  # killed workers' sockets would take (and reset) new connections
        self.index = self._index(workers, flags or [])
        self.index.start()

    def stop(self) -> None:
        self.index.stop()
        for v in self.volumes:
            v.stop()

    def replica_report(self, key: bytes) -> str:
        """Where placement puts `key` and what each volume holds there, with the last lines of
        every log: for an assertion message when a replica is not where it should be."""
        from minikv.placement import key2path, key2volume

        lines = [f"key {key!r}, volumes {self.names}:"]
        for vol in key2volume(key, self.names, self.replicas, self.subvolumes):
            path = self.volume_dir(vol) / key2path(key).lstrip("/")
            folder = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else "no folder"
            lines.append(f"  {vol}: {path} exists={path.exists()}, folder holds {folder}")
        for proc in [*self.volumes, self.index]:
            tail = proc.log.read_text(errors="replace").splitlines()[-15:] if proc.log.exists() else []
            running = proc.proc is not None and proc.proc.poll() is None
            lines.append(f"  {proc.log.name} (running={running}): " + " | ".join(tail))
        return "\n".join(lines)

    def url(self, key: str) -> str:
        return f"http://{HOST}:{self.port}{key}"

    def volume_dir(self, name: str) -> Path:
        """The directory of volume `host:port` (a subvolume suffix is kept as a subfolder)."""
        host, _, sub = name.partition("/")
        vol = self.volumes[self.names.index(host)]
        return Path(vol.args[-1]) / sub if sub else Path(vol.args[-1])

    def put(self, key: str, data: bytes, **kw) -> requests.Response:
        return self.session.put(self.url(key), data=data, **kw)

    def get(self, key: str, **kw) -> requests.Response:
        return self.session.get(self.url(key), **kw)

    def delete(self, key: str) -> requests.Response:
        return self.session.delete(self.url(key))

    def request(self, method: str, key: str, **kw) -> requests.Response:
        return self.session.request(method, self.url(key), **kw)
