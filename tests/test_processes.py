"""The processes minikv starts: every flag `minikv up` takes reaches the parts it applies to
(secrets through the environment, never the command line) or is refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from cluster import HOST, open_dir, wait_closed, wait_port
from test_faults import _owner_of_upload, fresh, start_upload, wait_until
from test_up import free_base
from test_volume import Volume, make_dir, read
from test_volume import free_port as vol_port

from minikv.cli import FLAGS, parse_args
from minikv.cluster import SECRET_ENV, SERVER, UP_FLAGS, VOLUME, VOLUMES
from minikv.volume import nginx as volume

# ---------------------------------------------------------------- minikv up passes its flags on

# a value unlike the default for every flag `up` hands to a part
GIVEN = {
    "host": HOST, "signed": "1m", "secret": "up-test-secret-0123", "s3-access-key": "AKIDUPTEST",
    "s3-secret-key": "up-test-s3-secret/+x", "replicas": "2", "subvolumes": "4", "protect": "true",
    "fallback": "127.0.0.1:9", "md5sum": "false", "voltimeout": "3s", "v": "true", "workers": "2",
    "verify-get": "true", "fsync": "true", "max-value-size": "1000", "max-connections": "50",
    "max-header-bytes": "4000", "max-url": "1000", "header-timeout": "7s", "body-timeout": "9s", "body-min-rate": "2048",
    "idle-timeout": "11s", "worker-timeout": "13s", "open-api": "read", "log-json": "true",
}
PASSED = sorted(name for name, parts in UP_FLAGS.items() if isinstance(parts, tuple) and parts)
REFUSED = sorted(name for name, parts in UP_FLAGS.items() if isinstance(parts, str))


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")[:-1]]


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [a.decode().partition("=") for a in f.read().split(b"\0") if a]
    return {k: v for k, _, v in pairs}


def tree(pid: int) -> list[int]:
    """`pid`'s descendants."""
    out = []
    for child in children(pid):
        out += [child, *tree(child)]
    return out


@pytest.fixture(scope="module")
def up_all():
    """`minikv up` given every flag it passes on; yields (base port, up's pid, its output)."""
    root = open_dir()
    base = free_base()
    argv = [sys.executable, "-m", "minikv", "up", "-data", str(root / "data"), "-port", str(base)]
    for name in PASSED:
        argv += [f"-{name}", GIVEN[name]]
    log = root / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in range(base, base + VOLUMES + 1):
            wait_port(port, up, timeout=20)
        yield base, up.pid, log
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=20)
        text = log.read_text()
        shutil.rmtree(root, ignore_errors=True)
    assert up.returncode == 0, text


def parts(up_pid: int) -> dict[str, list[int]]:
    """The pids of up's children by part (server, volume)."""
    found: dict[str, list[int]] = {SERVER: [], VOLUME: []}
    for pid in children(up_pid):
        argv = cmdline(pid)
        found[argv[argv.index("minikv") + 1]].append(pid)
    assert len(found[SERVER]) == 1 and len(found[VOLUME]) == VOLUMES, found
    return found


def test_every_flag_has_its_line_in_up_flags():
    """A new flag must say where `up` sends it (minikv/cluster.py UP_FLAGS), or it is refused."""
    assert sorted(UP_FLAGS) == sorted(FLAGS)
    assert sorted(GIVEN) == PASSED


@pytest.mark.parametrize("name", PASSED)
def test_up_passes_the_flag_to_each_part_it_applies_to(up_all, name):
    base, up_pid, _ = up_all
    by_part = parts(up_pid)
    want = parse_args([f"-{name}", GIVEN[name]]).flags[name]
    for part, pids in by_part.items():
        for pid in pids:
            argv = cmdline(pid)
            got = parse_args(argv[argv.index("minikv") + 1:])
            env = environ(pid)
            if name in SECRET_ENV:
                assert name not in got.given, argv  # never on a command line
                if part in UP_FLAGS[name]:
                    assert env.get(SECRET_ENV[name]) == GIVEN[name], (part, name)
                else:
                    assert SECRET_ENV[name] not in env, (part, name)
            elif part in UP_FLAGS[name]:
                assert name in got.given and got.flags[name] == want, (part, argv)
            else:
                assert name not in got.given, (part, argv)


def test_no_secret_on_any_command_line_below_up(up_all):
    base, up_pid, _ = up_all
    secrets = [GIVEN[name] for name in ("secret", "s3-secret-key")]
    below = tree(up_pid)
    assert len(below) > 1 + VOLUMES  # the server's workers and nginx's processes too
    for pid in below:
        try:
            line = " ".join(cmdline(pid))
        except FileNotFoundError:
            continue  # an nginx worker replaced meanwhile
        assert not any(s in line for s in secrets), line


def test_up_warns_of_a_secret_given_on_its_own_command_line(up_all):
    """`up` cannot hide its own argv: it says how to keep a secret out of it."""
    out = up_all[2].read_text()
    for name in ("secret", "s3-secret-key"):
        assert f"-{name} on the command line is visible to every user" in out and SECRET_ENV[name] in out
    assert "-s3-access-key on the command line" not in out  # not a secret
    assert GIVEN["secret"] not in out and GIVEN["s3-secret-key"] not in out


def test_up_flags_take_effect(up_all):
    """What the flags protect, seen from outside: S3 requests need a signature, plain writes the
    credentials (reads are open: -open-api read), volumes serve
    only signed reads and listen on -host only, the index enforces its limits."""
    base, _, _ = up_all
    url = f"http://{HOST}:{base}"
    r = requests.get(f"{url}/bucket/k", headers={"x-amz-date": "20260101T000000Z"})
    assert r.status_code == 403, r.text  # unsigned S3 requests: refused
    auth = (GIVEN["s3-access-key"], GIVEN["s3-secret-key"])
    assert requests.put(f"{url}/k", data=b"value").status_code == 401  # -open-api read: writes need them
    assert requests.put(f"{url}/k", data=b"x" * 1001, auth=auth).status_code == 413  # -max-value-size
    assert requests.get(f"{url}/k", headers={"X-Big": "b" * 4000}).status_code == 431  # -max-header-bytes
    assert requests.put(f"{url}/k", data=b"value", auth=auth).status_code == 201
    loc = requests.get(f"{url}/k", allow_redirects=False).headers["Location"]
    assert requests.get(loc).content == b"value"
    assert requests.get(loc.split("?")[0]).status_code == 403  # -signed reached the volumes
    for port in range(base + 1, base + 1 + VOLUMES):  # -host reached the volumes
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=1).close()


@pytest.mark.parametrize("name", REFUSED)
def test_up_refuses_a_flag_it_does_not_pass_on(name):
    root = open_dir()
    base = free_base()
    value = [] if FLAGS[name].kind is bool else ["1"]
    up = subprocess.Popen([sys.executable, "-m", "minikv", "up", "-data", str(root / "data"), "-port", str(base),
                           f"-{name}", *value], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        err = up.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGINT)  # it started instead: up stops what it started
        err = up.communicate(timeout=20)[1]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert up.returncode == 2
    assert f"minikv up: -{name}: " in err, err
    for port in range(base, base + VOLUMES + 1):
        wait_closed(port, timeout=1)


# ---------------------------------------------------------------- a worker whose loop hangs

# SIGSTOP stands in for a loop that spins or blocks: the process is alive, holds its connections
# and locked keys, and its event loop does not turn.


def _status(c, method: str, key: str, data: bytes = b"") -> int:
    try:
        return c.request(method, key, data=data, timeout=3).status_code
    except requests.RequestException:
        return 0  # a connection the stopped worker accepted


def _workers(c, n: int) -> list[int]:
    wait_until(lambda: len(children(c.index.proc.pid)) == n, what=f"{n} worker(s) running")
    return children(c.index.proc.pid)


def test_a_worker_whose_loop_stops_is_replaced_and_its_writes_undone(make_cluster):
    c = make_cluster(workers=2, flags=["-worker-timeout", "2s"])
    workers = _workers(c, 2)
    key = fresh()
    owner = 0
    upload = start_upload(c.port, key, 20 << 20, os.urandom(1 << 20))
    try:
        # DELETE, not PUT: a PUT sent before the upload's worker took the key would write it
        wait_until(lambda: _status(c, "DELETE", key) == 409, what="the upload holds the key")
        c.session.close()  # its kept-alive connection would pass for the upload's
        c.session = requests.Session()
        owner = _owner_of_upload(workers, c.port, upload)
        os.kill(owner, signal.SIGSTOP)
        wait_until(lambda: not os.path.exists(f"/proc/{owner}"), timeout=15, what="the stopped worker killed")
        wait_until(lambda: _status(c, "PUT", key, b"after") == 201, timeout=10, what="the key writable again")
        assert c.get(key).content == b"after"
        assert owner not in _workers(c, 2)
        log = c.index.log.read_text()
        assert f"worker {owner}'s event loop has not turned" in log and "undid 1 write(s)" in log, log
    finally:
        upload.close()
        if owner:
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner, signal.SIGCONT)


def test_a_single_worker_is_supervised_too(make_cluster):
    """-workers 1 runs under a supervisor like any other count: its hang (or death) is not the
    end of the server."""
    c = make_cluster(workers=1, flags=["-worker-timeout", "2s"])
    [worker] = _workers(c, 1)
    os.kill(worker, signal.SIGSTOP)
    try:
        wait_until(lambda: _workers(c, 1) != [worker], timeout=15, what="the stopped worker replaced")
        assert c.put("/one/k", b"v", timeout=5).status_code == 201
        [second] = _workers(c, 1)
        os.kill(second, signal.SIGKILL)
        wait_until(lambda: _status(c, "PUT", "/one/k2", b"w") == 201, timeout=10, what="a new worker serving")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)


def test_a_short_pause_is_not_a_hang(make_cluster):
    """A loop silent for less than -worker-timeout (a loaded machine, a long commit) is left alone."""
    c = make_cluster(workers=1, flags=["-worker-timeout", "3s"])
    [worker] = _workers(c, 1)
    # its loop runs (and beats): stopped while still starting, its silence would count from the
    # fork, and a start slowed by a loaded machine plus the pause could pass the timeout
    assert c.get("/pause/none", allow_redirects=False, timeout=10).status_code == 404
    os.kill(worker, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(worker, signal.SIGCONT)
    time.sleep(2.5)  # past the timeout counted from the last beat before the pause
    assert _workers(c, 1) == [worker]
    assert c.put("/pause/k", b"v", timeout=5).status_code == 201


# ---------------------------------------------------------------- a root-run volume follows no link

# The volume's folders belong to the user nginx's workers run as (www-data), who can plant a
# symlink to a folder of root's anywhere in them. `outside` stands for such a folder (/etc, say).

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only a root-run volume changes owners")


@pytest.fixture
def planted():
    """(volume folder, a root-owned folder outside it with a file in it)."""
    directory, outside = make_dir(), make_dir()
    with open(os.path.join(outside, "keep"), "w") as f:
        f.write("root's")
    yield directory, outside
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(outside, ignore_errors=True)


def untouched(outside: str) -> None:
    st = os.stat(outside)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755), st
    assert sorted(os.listdir(outside)) == ["keep"]
    with open(os.path.join(outside, "keep")) as f:
        assert f.read() == "root's"
    assert os.stat(os.path.join(outside, "keep")).st_uid == 0


def plant(link: str, target: str) -> None:
    os.symlink(target, link)
    uid, gid = volume.worker_user()[2:]
    os.lchown(link, uid, gid)  # as the workers' user would have made it


@needs_root
@pytest.mark.parametrize("name", ["body_temp", ".nginx"])
def test_volume_refuses_a_link_in_place_of_its_own_folders(planted, name):
    directory, outside = planted
    plant(os.path.join(directory, name), outside)
    proc = subprocess.Popen([sys.executable, "-m", "minikv", "volume", "-host", HOST, "-port", str(vol_port()),
                             directory], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
        raise AssertionError(f"the volume started on a planted {name}:\n{out}") from None
    finally:
        untouched(outside)
    assert proc.returncode == 1 and f"{name} is a symlink" in out and "remove it" in out, out


@needs_root
def test_a_state_folder_the_workers_user_owned_is_made_anew(planted):
    """DIR/.nginx owned by the workers' user (as minikv made it before) may hold links where
    root's nginx writes its pid file and makes its temp folders: it is replaced by root's own."""
    directory, outside = planted
    state = os.path.join(directory, ".nginx")
    os.mkdir(state)
    plant(os.path.join(state, "nginx.pid"), os.path.join(outside, "keep"))
    plant(os.path.join(state, "proxy_temp"), outside)
    uid, gid = volume.worker_user()[2:]
    os.chown(state, uid, gid)
    server = Volume(directory)
    try:
        untouched(outside)
        st = os.lstat(state)
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)
        assert "made " + state + " anew" in read(server.log)
        assert requests.put(f"{server.url}/ab/cd/a2V5", data=b"v" * 100_000).status_code == 201
    finally:
        server.stop()
    untouched(outside)


@needs_root
def test_links_in_the_data_are_not_followed(planted):
    directory, outside = planted
    os.makedirs(os.path.join(directory, "sv01", "ab"))
    plant(os.path.join(directory, "sv01", "ab", "cd"), outside)
    plant(os.path.join(directory, "ef"), outside)
    server = Volume(directory)
    try:
        untouched(outside)
        assert os.stat(os.path.join(directory, "sv01", "ab")).st_uid == volume.worker_user()[2]
    finally:
        server.stop()


@needs_root
def test_folders_swapped_for_links_while_running_redirect_nothing(planted):
    """nginx makes its folders again (and gives them to the workers' user) on every reload
    (SIGHUP): it reaches them through the folders minikv opened, not through their names."""
    directory, outside = planted
    server = Volume(directory)
    try:
        for name in ("body_temp", ".nginx"):
            os.rename(os.path.join(directory, name), os.path.join(directory, name + ".moved"))
            plant(os.path.join(directory, name), outside)
        os.kill(server.proc.pid, signal.SIGHUP)  # forwarded to nginx: a reload
        time.sleep(1)
        untouched(outside)
        # uploads still spool to the real body_temp (a body past the memory buffer goes to a file)
        assert requests.put(f"{server.url}/ab/cd/a2V5", data=b"v" * 1_000_000).status_code == 201
        assert requests.get(f"{server.url}/ab/cd/a2V5").content == b"v" * 1_000_000
        untouched(outside)
    finally:
        server.stop()
    untouched(outside)


def _chain(top: str, depth: int) -> str:
    """A chain of `depth` folders below `top` (made through descriptors: os.makedirs recurses
    too), with an old file at its end; the chain's last folder."""
    fd = os.open(top, os.O_RDONLY)
    path = top
    for _ in range(depth):
        os.mkdir("x", dir_fd=fd)
        child = os.open("x", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = child, path + "/x"
    os.close(os.open("0000000001", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.utime("0000000001", (time.time() - 7200,) * 2, dir_fd=fd)
    os.close(fd)
    return path


# The Go original's keys make folder chains over a thousand deep: the take-over of a root-run
# volume's folders and gc's clean-up of the spool walked them with os.fwalk, which recurses, and
# died of RecursionError (the volume did not start).
@needs_root
def test_a_volume_with_folder_chains_deeper_than_pythons_recursion_starts(planted):
    directory, _ = planted
    os.makedirs(os.path.join(directory, "ab", "cd"))
    deepest = _chain(os.path.join(directory, "ab", "cd"), 1500)
    server = Volume(directory)
    try:
        assert os.stat(deepest).st_uid == volume.worker_user()[2]
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", os.path.join(directory, "ab")])  # shutil.rmtree recurses too


@needs_root
def test_gc_of_the_spool_goes_past_a_folder_it_cannot_read(planted):
    """gc run as another user than the spool's folders' stopped at the first it could not open
    (os.fwalk skipped it): the rest of the spool was left, and so was the rest of gc."""
    directory, _ = planted
    spool = os.path.join(directory, "body_temp")
    os.makedirs(os.path.join(spool, "1"), mode=0o700)  # root's, closed
    os.makedirs(os.path.join(spool, "3"))
    old_file = os.path.join(spool, "3", "0000000001")
    with open(old_file, "w") as f:
        f.write("old upload")
    os.utime(old_file, (time.time() - 7200,) * 2)
    for path in (directory, spool, os.path.join(spool, "3"), old_file):
        os.chown(path, 65534, 65534)
    code = ("import sys; from minikv.admin.gc import clean_spool; from minikv.admin.progress import Progress; "
            "p = Progress('gc', bar=False); clean_spool(sys.argv[1], 3600, False, p); "
            "print(p.counts.get('temp files'), p.counts.get('failed'))")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code,
                        directory], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"], (r.stdout, r.stderr)
    assert not os.path.exists(old_file) and "cannot read" in r.stderr


def test_gc_cleans_a_spool_with_folder_chains_deeper_than_pythons_recursion(planted):
    from minikv.admin.gc import clean_spool
    from minikv.admin.progress import Progress

    directory, _ = planted
    os.mkdir(os.path.join(directory, "body_temp"))
    deepest = _chain(os.path.join(directory, "body_temp"), 1500)
    progress = Progress("gc", bar=False)
    try:
        clean_spool(directory, 3600, False, progress)
        assert os.listdir(deepest) == [] and progress.counts.get("temp files") == 1
    finally:
        subprocess.run(["rm", "-rf", os.path.join(directory, "body_temp")])  # shutil.rmtree recurses too


@needs_root
@pytest.mark.parametrize("where", ["body_temp", "body_temp/sub"])
def test_gc_does_not_follow_a_link_in_the_upload_spool(planted, where, capsys):
    from minikv.admin.gc import clean_spool
    from minikv.admin.progress import Progress

    directory, outside = planted
    spool = os.path.join(directory, "body_temp")
    os.mkdir(spool)
    with open(os.path.join(spool, "0000000001"), "w") as f:
        f.write("old upload")
    old = time.time() - 7200
    for path in (os.path.join(outside, "keep"), os.path.join(spool, "0000000001")):
        os.utime(path, (old, old))
    if where == "body_temp":  # the spool itself swapped for a link
        os.rename(spool, os.path.join(directory, "spool"))
    plant(os.path.join(directory, where), outside)
    progress = Progress("gc", bar=False)
    clean_spool(directory, 3600, False, progress)
    untouched(outside)
    if where == "body_temp":
        assert progress.counts["failed"] == 1 and "is a symlink" in capsys.readouterr().err
    else:  # the real old upload is gone, the link's target stays
        assert progress.counts["temp files"] == 1 and os.listdir(spool) == ["sub"]


def test_no_nginx_process_holds_the_config_with_the_secret():
    """The workers' user (www-data, often another web server's too) could read a descriptor of
    the config they inherited through /proc/<worker>/fd, and with it the volume's secret: only
    the master reads the config, through a path to minikv's own descriptor, and closes it."""
    top = open_dir()  # a folder the workers' user can reach
    directory = str(top / "vol")
    os.mkdir(directory)
    env = {**os.environ, "MINIKV_SECRET": "s3cretForTheVolumes"}
    port = vol_port()
    log = top / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "minikv", "volume", "-host", HOST, "-port", str(port),
                                 directory], stdout=out, stderr=out, env=env, start_new_session=True)
    try:
        wait_port(port, proc)
        master = int(next(ln for ln in log.read_text().splitlines() if "nginx pid" in ln).rsplit(" ", 1)[1]
                     .rstrip(")"))
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True,
                                  text=True).stdout.split()
        assert children  # the workers
        for pid in [master, *map(int, children)]:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert not [ln for ln in links if "minikv-nginx.conf" in ln], (pid, links)
        # the config is still there for a reload: the volume answers after a SIGHUP
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1)
        assert requests.put(f"http://{HOST}:{port}/ab/cd/a2V5", data=b"v").status_code == 403  # no secret
        assert requests.put(f"http://{HOST}:{port}/ab/cd/a2V5", data=b"v",
                            headers={"X-Minikv-Secret": "s3cretForTheVolumes"}).status_code == 201
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(top, ignore_errors=True)
