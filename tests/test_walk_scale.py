"""The walk of the volumes at the speed of the disks (issue 15): verify's walk shared out among
processes as rebuild's is (admin/parts.py), finding what one process finds, and failing loudly
when one of them dies; the listings of `<aa>/<bb>` folders read without the JSON parser when
nginx wrote them in its usual layout (admin/walk.py plain_entries). Real volumes (nginx), real
index processes, real LMDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import holders, key_with_slash, ready, restart, write  # noqa: E402

from minikv.admin.walk import parse_mtime, plain_entries  # noqa: E402
from minikv.placement import key2path  # noqa: E402


def verify(c, *flags: str, volumes: list[str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "minikv", "verify", "-volumes", ",".join(volumes or c.names),
            "-db", str(c.root / "index"), "-replicas", str(c.replicas), "-subvolumes", str(c.subvolumes), *flags]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def plain_files(body: bytes, path: str) -> list[tuple[str, int, int]] | None:
    """(path + name, size, mtime_ms) of each file of a plain listing (admin/walk.py plain_entries),
    as str: what the JSON parser gives; None for anything else."""
    found = plain_entries(body)
    try:
        return None if found is None else [(path + name.decode(), int(size), parse_mtime(mtime.decode()))
                                           for name, mtime, size in found]
    except UnicodeDecodeError:
        return None


def findings(r: subprocess.CompletedProcess) -> tuple[list[str], str]:
    """The problem lines (sorted: processes report in any order) and the summary's counts."""
    lines = r.stderr.splitlines()
    summary = next(line for line in lines if line.startswith("verify: ") and "keys seen" in line)
    problems = sorted(line for line in lines if line.startswith("verify: /"))
    return problems, summary.rsplit(" in ", 1)[0]


def test_plain_files_reads_a_listing_as_the_json_parser_does_and_leaves_it_the_rest(make_cluster):
    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    keys = {f"/pf/{i}": os.urandom(i + 1) for i in range(40)}
    nested = key_with_slash()
    keys[nested] = b"nested"
    write(c, keys)
    top = c.volume_dir(c.names[0])
    odd = top / key2path(b"/pf/0")[1:3]  # an <aa> folder
    odd = next(p for p in odd.iterdir() if p.is_dir())
    (odd / 'a"b').write_bytes(b"x")  # a name nginx escapes in JSON
    checked = fallback = 0
    for aa in sorted(p for p in top.iterdir() if p.is_dir() and len(p.name) == 2):
        for bb in sorted(p for p in aa.iterdir() if p.is_dir()):
            path = f"/{aa.name}/{bb.name}/"
            body = requests.get(f"http://{c.names[0]}{path}").content
            entries = json.loads(body)
            got = plain_files(body, path)
            if got is None:
                # what it leaves to the JSON parser: a nested folder, an escaped name
                assert any(e["type"] == "directory" or '"' in e["name"] for e in entries), body
                fallback += 1
                continue
            assert [(f, s) for f, s, _ in got] == [(path + e["name"], e["size"]) for e in entries]
            assert all(m > 1_600_000_000_000 for _, _, m in got)
            checked += 1
    assert checked >= 30 and fallback == 2, (checked, fallback)
    assert plain_files(b"[\r\n]", "/00/00/") == []
    assert plain_files(b"<html>", "/00/00/") is None


def test_verify_in_two_processes_finds_what_one_process_finds(make_cluster):
    """A missing copy, one of the wrong size, an orphan and misplaced keys: the same lines and
    counts whether one process walks the volumes or two, over HTTP and from the folders."""
    c = make_cluster(volumes=4, replicas=2, subvolumes=4)
    keys = {f"/vw/{i}": os.urandom(64 + i) for i in range(60)}
    restart(c, c.names[:3])
    write(c, keys)
    ready(c)
    missing, short, orphan = sorted(keys)[:3]
    (c.volume_dir(sorted(holders(c, missing))[0]) / key2path(missing.encode())[1:]).unlink()
    (c.volume_dir(sorted(holders(c, short))[0]) / key2path(short.encode())[1:]).write_bytes(b"x")
    spare = next(f"{n}/sv00" for n in c.names[:3] if f"{n}/sv00" not in holders(c, orphan))
    target = c.volume_dir(spare) / key2path(orphan.encode())[1:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(keys[orphan])
    dirs = [str(c.volume_dir(n)) for n in c.names]
    runs = {(how, n): verify(c, "-workers", str(n), *(dirs if how == "local" else []))
            for how in ("http", "local") for n in (1, 2)}
    seen = {what: findings(r) for what, r in runs.items()}
    problems, summary = seen[("http", 1)]
    assert all(r.returncode == 1 for r in runs.values()), {k: r.stderr for k, r in runs.items()}
    assert all(s == seen[("http", 1)] for s in seen.values()), seen
    assert "2 under-replicated" in summary and "1 missing files" in summary, summary  # missing, short
    assert "1 files of wrong size" in summary and "1 orphan files" in summary, summary
    assert f"verify: {orphan}: {spare}: orphan (no record names this copy)" in problems
    assert any(line.startswith(f"verify: {missing}: ") and "missing" in line for line in problems)
    misplaced = [line for line in problems if ": misplaced: " in line]
    assert misplaced and f"{len(misplaced)} misplaced" in summary, summary


def spawned(pid: int) -> list[int]:
    """The processes a command spawned to walk (multiprocessing's, not its resource tracker)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    if b"spawn_main" in f.read():
                        out.append(kid)
            except FileNotFoundError:
                pass
    return out


def test_a_verify_process_that_dies_mid_walk_makes_the_command_fail(make_cluster):
    """Its share of the walk was not done (orphans there unsearched): never a clean report."""
    c = make_cluster(volumes=2, replicas=2, subvolumes=2)
    write(c, {f"/vd/{i}": os.urandom(20) for i in range(40)})
    ready(c)
    args = [sys.executable, "-m", "minikv", "verify", "-volumes", ",".join(c.names), "-db", str(c.root / "index"),
            "-replicas", "2", "-subvolumes", "2", "-workers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(kids := spawned(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "verify walked without processes"
            time.sleep(0.005)
        # the volumes were probed before the walk began: hold one so the walk cannot end, then
        # kill a process of the walk in the middle of it
        with c.volumes[0].held():
            os.kill(kids[0], signal.SIGKILL)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "a verify process exited with -9 before it finished" in err, err
    _, summary = findings(subprocess.CompletedProcess(args, 1, out, err))
    assert " 1 failed" in summary or ", 1 failed" in summary, summary
