"""A PostgreSQL of one's own in a folder: what `minikv up -postgres` runs its index on, and what
the tests start theirs with (tests/pg.py).

Debian's `postgresql` package puts its programs in /usr/lib/postgresql/<version>/bin, outside
PATH; elsewhere they are looked for on PATH. PostgreSQL refuses to run as root: as root, the
folder is handed to an unprivileged user (postgres, or nobody) and the programs run as it.

`up`'s instance listens on no TCP port at all, only on a unix socket inside its folder, which
only that user (and root) may enter; so it can trust whoever connects there, and its URL carries
no password. The postmaster runs in the foreground as `up`'s child, in its own process group,
and is stopped by pid: SIGINT is PostgreSQL's fast shutdown (sessions cut, a clean checkpoint).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

PORT = 5432  # only names the socket file (.s.PGSQL.5432): no TCP port is opened
USER = "minikv"
DATABASE = "postgres"  # made by initdb; the instance holds nothing else
SOCKET_MAX = 100  # bytes a unix socket's path may take (108 with its NUL, in sun_path)
INSTALL = "apt-get install postgresql"


def bin_dir() -> Path | None:
    """Where PostgreSQL's server programs are (the newest version's), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres") or shutil.which("pg_ctl")
    return Path(postgres).parent if postgres else None


def _version(path: str) -> tuple:
    v = Path(path).parent.parent.name
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def unprivileged_user() -> str | None:
    """The user PostgreSQL must run as: None unless we are root (it refuses root)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise SystemExit("PostgreSQL refuses to run as root and there is no postgres or nobody user to run it as")


def give_to(path: Path, user: str | None) -> None:
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


class LocalPostgres:
    """The instance in `root` (its cluster in root/db, its socket in root): made at the first
    start, reused after."""

    def __init__(self, root: str | Path, max_connections: int = 100):
        self.root = Path(root).absolute()
        self.db = self.root / "db"
        self.max_connections = max_connections
        self.bin = bin_dir()
        self.user = unprivileged_user()
        self.proc: subprocess.Popen | None = None

    def problem(self) -> str | None:
        """Why this instance cannot start (one line), or None."""
        if self.bin is None or not (self.bin / "initdb").exists():
            return f"PostgreSQL is not installed (initdb and postgres not found): {INSTALL}"
        if len(str(self.root / f".s.PGSQL.{PORT}")) > SOCKET_MAX:
            return (f"the path of {self.root} is too long for PostgreSQL's unix socket: "
                    f"use a -data folder with a shorter path")
        return None

    def url(self) -> str:
        return f"postgresql://{USER}@/{DATABASE}?host={quote(str(self.root), safe='/')}&port={PORT}"

    def _as_user(self) -> dict:
        if self.user is None:
            return {}
        pw = pwd.getpwnam(self.user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def init(self) -> bool:
        """Make the cluster if there is none yet; True if it was made now."""
        self.root.mkdir(parents=True, exist_ok=True)
        give_to(self.root, self.user)
        self.root.chmod(0o700)  # the socket's folder: whoever enters it is trusted
        if (self.db / "PG_VERSION").exists():
            return False
        if self.db.exists():  # an initdb cut short: it made nothing worth keeping
            shutil.rmtree(self.db)
        out = subprocess.run([str(self.bin / "initdb"), "-D", str(self.db), "-U", USER, "-A", "trust",
                              "-E", "UTF8", "--locale=C"], capture_output=True, text=True, cwd=self.root,
                             timeout=120, **self._as_user())
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")
        return True

    def start(self, log: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
        """Run the postmaster as a child in its own process group; return once it takes
        connections (raises RuntimeError, the postmaster stopped, if it does not)."""
        log = log or self.root / "log"
        with open(log, "ab") as out:
            give_to(log, self.user)
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.db), "-k", str(self.root), "-p", str(PORT),
                 "-c", "listen_addresses=", "-c", f"max_connections={self.max_connections}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                start_new_session=True, **self._as_user())
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError("PostgreSQL did not start: " + " / ".join(tail))
            time.sleep(0.1)
        return self.proc

    def ready(self) -> bool:
        """Does our postmaster take connections? (postmaster.pid: its pid first, its state last)"""
        try:
            lines = (self.db / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.proc.pid) and lines[7].strip() == "ready"

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL to its process group."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                (os.killpg if sig == signal.SIGKILL else os.kill)(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
