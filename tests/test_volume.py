"""The volume server: real `minikv volume` processes (nginx underneath) on loopback ports.

One shared server answers the HTTP tests; tests about starting and stopping run their own.
Servers run in their own process group and are stopped by group, never by name.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests

from minikv.ops import disk
from minikv.volume import nginx as volume

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"), reason="nginx not installed"
)

IS_ROOT = os.geteuid() == 0
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"minikv volume exited with {proc.returncode}:\n{read(log)}")
        try:
            # an answer, not just a connect: the master listens before any worker is up
            requests.head(f"http://{HOST}:{port}/", timeout=0.5)
            return
        except requests.RequestException:
            time.sleep(0.02)
    raise AssertionError(f"minikv volume did not answer on port {port}:\n{read(log)}")


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


class Volume:
    """A running `minikv volume` and what the tests need to know about it."""

    def __init__(self, directory: str, port_from_env: bool = False, as_nobody: bool = False):
        self.directory = directory
        self.port = free_port()
        self.log = tempfile.mktemp(prefix="minikv-volume-log-")
        cmd = [sys.executable, "-m", "minikv", "volume", "-host", HOST]
        env = dict(os.environ)
        if port_from_env:
            env["PORT"] = str(self.port)
        else:
            cmd += ["-port", str(self.port)]
        cmd.append(directory)
        if as_nobody:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)
        try:
            wait_for_port(self.port, self.proc, self.log)
        except AssertionError:
            self.stop()
            raise
        self.url = f"http://{HOST}:{self.port}"

    def nginx_pid(self) -> int:
        line = next(ln for ln in read(self.log).splitlines() if "nginx pid" in ln)
        return int(line.rsplit(" ", 1)[1].rstrip(")"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(timeout=15)
        finally:
            if os.path.exists(self.log):
                os.unlink(self.log)


def make_dir() -> str:
    # not pytest's tmp_path: as root it sits in a 0700 folder that nginx's workers cannot enter
    directory = tempfile.mkdtemp(prefix="minikv vol ")
    os.chmod(directory, 0o755)
    return directory


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def workers_of(master: int, uid: int, timeout: float = 5.0) -> list[int]:
    """nginx's workers once they are all running as uid (a new worker starts as the master's
    user and switches right after the fork)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = children(master)
        try:
            if workers and all(uid_of(pid) == uid for pid in workers):
                return workers
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nginx {master} has no workers running as uid {uid}: {workers}")
        time.sleep(0.02)


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def worker_uid() -> int:
    """The user root's nginx workers become, as run_volume picks it."""
    return volume.worker_user()[2]


@pytest.fixture(scope="module")
def vol():
    directory = make_dir()
    server = Volume(directory)
    yield server
    server.stop()
    shutil.rmtree(directory)


@pytest.fixture
def own_dir():
    directory = make_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_volume(own_dir):
    """Start servers on own_dir; whatever a test does, they are stopped before own_dir goes."""
    started = []

    def start(**kwargs) -> Volume:
        started.append(Volume(own_dir, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------- config


def test_render_config_quotes_paths_and_sets_users():
    conf = volume.render_config(3001, '/data/my "vol" $1', "::1", user=("www-data", "www-data"), nofile=4096)
    assert 'user "www-data" "www-data";' in conf
    assert "listen [::1]:3001 default_server backlog=4096;" in conf
    assert 'root "/data/my \\"vol\\" ${dollar}1";' in conf
    assert 'geo $dollar { default "$"; }' in conf
    assert 'client_body_temp_path "/data/my \\"vol\\" $1/body_temp";' in conf
    assert 'pid "/data/my \\"vol\\" $1/.nginx/nginx.pid";' in conf
    assert "worker_rlimit_nofile 4096;" in conf
    assert conf.count("{") == conf.count("}")

    plain = volume.render_config(3002, "/srv/vol1/")
    assert "user " not in plain and "geo " not in plain
    assert "listen 3002 default_server" in plain
    assert 'root "/srv/vol1";' in plain
    for directive in ("proxy", "fastcgi", "uwsgi", "scgi"):
        assert f'{directive}_temp_path "/srv/vol1/.nginx/{directive}_temp";' in plain
    for needed in ("daemon off;", "error_log stderr;", "dav_methods PUT DELETE;", "autoindex_format json;"):
        assert needed in plain


def test_render_config_refuses_line_breaks():
    with pytest.raises(volume.VolumeError):
        volume.render_config(3001, "/data/bad\nname")


def test_missing_nginx_says_how_to_install(monkeypatch):
    monkeypatch.setattr(volume.shutil, "which", lambda *a, **k: None)
    with pytest.raises(volume.VolumeError, match="apt-get install nginx"):
        volume.find_nginx()


# ---------------------------------------------------------------- HTTP


def test_put_get_overwrite_delete(vol):
    url = f"{vol.url}/sv03/5d/41/aGVsbG8="
    r = requests.put(url, data=b"hello")
    assert r.status_code == 201
    with open(os.path.join(vol.directory, "sv03/5d/41/aGVsbG8="), "rb") as f:
        assert f.read() == b"hello"

    assert requests.put(url, data=b"hello, world").status_code == 204  # nginx's answer to an overwrite
    r = requests.get(url)
    assert r.status_code == 200 and r.content == b"hello, world"

    r = requests.head(url)
    assert r.status_code == 200 and r.headers["Content-Length"] == "12"

    r = requests.get(url, headers={"Range": "bytes=7-11"})
    assert r.status_code == 206
    assert r.content == b"world" and r.headers["Content-Range"] == "bytes 7-11/12"

    assert requests.delete(url).status_code == 204
    assert requests.get(url).status_code == 404
    assert requests.delete(url).status_code == 404


def test_chunked_put(vol):
    url = f"{vol.url}/sv01/aa/bb/Y2h1bmtlZA=="
    r = requests.put(url, data=iter([b"chunk one, ", b"chunk two"]))  # a generator goes out chunked
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 201
    assert requests.get(url).content == b"chunk one, chunk two"


def test_json_listing(vol):
    assert requests.put(f"{vol.url}/sv07/12/34/a2V5", data=b"x").status_code == 201
    r = requests.get(f"{vol.url}/sv07/12/")
    assert r.status_code == 200
    assert [(e["name"], e["type"]) for e in r.json()] == [("34", "directory")]
    files = requests.get(f"{vol.url}/sv07/12/34/").json()
    assert [(e["name"], e["type"], e["size"]) for e in files] == [("a2V5", "file", 1)]


def test_aborted_put_leaves_nothing(vol):
    path = "/sv02/ab/cd/YWJvcnRlZA=="
    with socket.create_connection((HOST, vol.port)) as s:
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n".encode())
        s.sendall(b"x" * 100_000)
        time.sleep(0.1)  # let nginx spool the start of the body to body_temp
    body_temp = os.path.join(vol.directory, "body_temp")
    deadline = time.monotonic() + 3
    while os.listdir(body_temp) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(body_temp) == []  # nginx removes its spool file when the client goes
    assert not os.path.exists(os.path.join(vol.directory, path.lstrip("/")))
    assert requests.get(vol.url + path).status_code == 404
    assert requests.put(vol.url + path, data=b"again").status_code == 201


@pytest.mark.parametrize(
    "path", ["/body_temp/", "/body_temp", "/.nginx/nginx.pid", "/%62ody_temp/x", "//.nginx/"]
)
def test_internal_folders_are_closed(vol, path):
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        r = requests.request(method, vol.url + path, data=b"x" if method == "PUT" else None)
        assert r.status_code == 403, (method, path)
    assert os.path.exists(os.path.join(vol.directory, ".nginx", "nginx.pid"))


def test_volume_root_cannot_be_deleted(vol):
    assert requests.delete(vol.url + "/").status_code == 403
    assert requests.get(vol.url + "/").status_code == 200
    assert os.path.isdir(os.path.join(vol.directory, "body_temp"))


# ---------------------------------------------------------------- starting and stopping


def test_port_env_var(start_volume):
    server = start_volume(port_from_env=True)
    assert "-port" not in server.proc.args
    assert requests.put(f"{server.url}/k", data=b"v").status_code == 201


def test_sigterm_stops_nginx(start_volume, own_dir):
    server = start_volume()
    master = server.nginx_pid()
    workers = workers_of(master, worker_uid() if IS_ROOT else os.geteuid())
    os.kill(server.proc.pid, signal.SIGTERM)  # only minikv: it must pass the signal on
    assert server.proc.wait(timeout=10) == 0
    for pid in [master, *workers]:
        assert not os.path.exists(f"/proc/{pid}"), f"nginx pid {pid} outlived minikv volume"
    assert not [n for n in os.listdir(os.path.join(own_dir, ".nginx")) if n.endswith(".conf")]


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_as_root_workers_are_unprivileged_and_take_over_old_data(start_volume, own_dir):
    # data left by a volume run as root (the Go original, say): root-owned folders and files
    old = os.path.join(own_dir, "sv00", "ab", "cd")
    os.makedirs(old)
    with open(os.path.join(old, "b2xk"), "wb") as f:
        f.write(b"old")
    server = start_volume()
    assert "gave 3 directories" in read(server.log)  # sv00, ab and cd
    workers_of(server.nginx_pid(), worker_uid())  # not root

    assert requests.put(f"{server.url}/sv00/ab/cd/b2xk", data=b"new").status_code == 204
    assert requests.get(f"{server.url}/sv00/ab/cd/b2xk").content == b"new"
    assert requests.delete(f"{server.url}/sv00/ab/cd/b2xk").status_code == 204
    assert requests.put(f"{server.url}/sv09/ff/ee/bmV3", data=b"x").status_code == 201
    assert os.stat(os.path.join(own_dir, "sv09/ff/ee/bmV3")).st_uid == worker_uid()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become another user")
def test_as_normal_user(start_volume, own_dir):
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(own_dir, nobody, -1)
    server = start_volume(as_nobody=True)
    assert uid_of(server.nginx_pid()) == nobody
    workers_of(server.nginx_pid(), nobody)
    assert requests.put(f"{server.url}/sv01/00/11/dXNlcg==", data=b"u").status_code == 201
    assert requests.get(f"{server.url}/sv01/00/11/dXNlcg==").content == b"u"
    assert os.stat(os.path.join(own_dir, "sv01/00/11/dXNlcg==")).st_uid == nobody


@pytest.mark.skipif(not IS_ROOT, reason="only root's workers change user")
def test_as_root_refuses_folder_workers_cannot_reach(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    out = subprocess.run(
        [sys.executable, "-m", "minikv", "volume", "-port", str(free_port()), str(closed / "vol")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 1
    assert "chmod o+x" in out.stderr


def test_listing_is_json(vol):
    r = requests.get(vol.url + "/")
    assert r.headers["Content-Type"].startswith("application/json")
    assert "body_temp" in [e["name"] for e in json.loads(r.text)]


def fake_sys(root, st_dev: int, device: str, journal_task: str | None):
    """A /sys with what ext4_without_journal reads: the block device of `st_dev`, and its
    ext4 entry (none when `journal_task` is None)."""
    block = root / "dev" / "block"
    block.mkdir(parents=True)
    (block / f"{os.major(st_dev)}:{os.minor(st_dev)}").symlink_to(f"../../devices/virtual/block/{device}")
    if journal_task is not None:
        (root / "fs" / "ext4" / device).mkdir(parents=True)
        (root / "fs" / "ext4" / device / "journal_task").write_text(journal_task + "\n")
    return str(root)


@pytest.mark.parametrize("journal_task, warned", [("<none>", True), ("jbd2/vdz-8", False), (None, False)])
def test_ext4_without_journal_names_the_device_only_when_the_kernel_says_none(tmp_path, journal_task, warned):
    data = tmp_path / "vol"
    data.mkdir()
    sys_root = fake_sys(tmp_path / "sys", os.stat(data).st_dev, "vdz", journal_task)
    assert disk.ext4_without_journal(str(data), sys_root) == ("vdz" if warned else None)
    assert disk.ext4_without_journal(str(tmp_path / "missing"), sys_root) is None


def test_ext4_without_journal_agrees_with_the_journals_the_kernel_runs(tmp_path):
    """On this machine's own file system: a journal found by name in /proc/fs/jbd2 (its
    `<device>-<inode>` entries), or the folder not on an ext4 at all."""
    device = disk.ext4_without_journal(str(tmp_path))
    if device is None:
        return  # a journal, or not an ext4: both are fine for a volume
    assert os.path.isdir(f"/proc/fs/ext4/{device}")
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    assert not [j for j in journals if j.startswith(device + "-")], journals


def test_a_volume_on_an_ext4_without_a_journal_says_so_at_start(start_volume, own_dir):
    """Said once, as the volume starts, where its operator reads; and never on another disk."""
    vol = start_volume()
    device = disk.ext4_without_journal(own_dir)
    said = read(vol.log)
    assert said.count("without a journal") == (device is not None), said
    if device is not None:
        assert f"tune2fs -j /dev/{device}" in said, said
