"""Rebuild at scale, A/B: this checkout's `minikv rebuild` against another checkout's (main, say),
beside the Go original and the floors of this machine, in one run on the same files.

    .venv/bin/python bench/rebuild_ab.py --data DIR [--keys 1000000] [--base SRC] [--go-src GO]
                                         [--pg URL] [--rounds 1]

The files of --keys keys (1,024 bytes, 3 replicas on 3 volumes, 10 subvolumes: scale.py's
layout) are written once into --data and kept there for later runs (writing a million keys'
files takes many minutes; the volume ports are chosen then and stored in DIR/meta.json, since
placement depends on the volumes' names). Then, with 3 `minikv volume`s on them:
 1. the floors: `find` listing every file with its size and mtime (3 processes, one a volume),
    and a Python scandir + stat walk of the same folders alone (2 processes, as rebuild's 2);
 2. each round, for each checkout (--base first, then this one): rebuild over HTTP, and rebuild
    from the local folders, each into a new LMDB index; the Go original's rebuild once;
 3. with --pg URL (a PostgreSQL database, emptied first): this checkout's local rebuild into it.
Each command is its own process (scale.run: wall time, peak RSS). Everything but --data is
removed at the end; --data is the caller's to remove.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from admin import HOST, Cluster, free_port, machine, wait_port  # noqa: E402
from scale import REPLICAS, SUBVOLUMES, find_go, run, write_files  # noqa: E402


def data(opts) -> tuple[list[str], list[str]]:
    """The volume folders and names of --data, written first when they are not there."""
    folder = Path(opts.data)
    meta = folder / "meta.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info["keys"] != opts.keys:
            raise SystemExit(f"bench: {folder} holds {info['keys']} keys, not {opts.keys}: use another --data")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)  # nginx workers run as www-data when we are root
        info = {"keys": opts.keys, "names": [f"{HOST}:{free_port()}" for _ in range(3)]}
        dirs = [str(folder / f"vol{i}") for i in range(3)]
        print(f"bench: writing {opts.keys:,} keys' files into {folder} ...", file=sys.stderr)
        rate = write_files(dirs, info["names"], opts.keys, b"v" * 1024, 2)
        print(f"bench: {rate:,.0f} keys/s written", file=sys.stderr)
        meta.write_text(json.dumps(info))
    return [str(folder / f"vol{i}") for i in range(3)], info["names"]


def scan_part(dirs: list[str], aas: list[int]) -> int:
    """Every file below `<aa>` of `aas` in every (sub)volume of `dirs`, with an lstat: files."""
    n = 0
    for d in dirs:
        for sv in sorted(os.listdir(d)):
            if not sv.startswith("sv"):
                continue
            for aa in aas:
                try:
                    bbs = os.scandir(f"{d}/{sv}/{aa:02x}")
                except FileNotFoundError:
                    continue
                with bbs:
                    for bb in bbs:
                        with os.scandir(bb.path) as files:
                            for f in files:
                                f.stat(follow_symlinks=False)
                                n += 1
    return n


def scan_floor(dirs: list[str], procs: int = 2) -> dict:
    start = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        n = sum(pool.starmap(scan_part, [(dirs, list(range(i, 256, procs))) for i in range(procs)]))
    return {"seconds": time.monotonic() - start, "files": n}


def find_floor(dirs: list[str]) -> dict:
    start = time.monotonic()
    procs = [subprocess.Popen(["find", d, "-type", "f", "-printf", "%s %T@ %f\n"], stdout=subprocess.DEVNULL)
             for d in dirs]
    for p in procs:
        p.wait()
    return {"seconds": time.monotonic() - start}


def start_volume(cluster: Cluster, tmp: Path, name: str, folder: str, tries: int = 60) -> None:
    """A `minikv volume` on `folder` as `name`. Its port was free when the files were written, but
    any process's outgoing connection may hold it as its local port a while: tried again then."""
    port = int(name.rsplit(":", 1)[1])
    for _ in range(tries):
        proc = cluster.spawn(["volume", "-host", HOST, "-port", str(port), folder], f"{port}.log")
        try:
            wait_port(port, proc, "a volume", timeout=900)
            return
        except SystemExit:
            log = (tmp / f"{port}.log").read_text()
            if "Address already in use" not in log:
                print(log[-2000:], file=sys.stderr)
                raise
        print(f"bench: port {port} is busy, trying again in 5 s", file=sys.stderr)
        time.sleep(5)
    raise SystemExit(f"bench: port {port} stayed busy")


def rebuild(src: Path, names: list[str], db: str, dirs: list[str], what: str, extra=()) -> dict:
    """`minikv rebuild` of checkout `src` (its minikv first on the path: python -P)."""
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src)
    try:
        return run([sys.executable, "-P", "-m", "minikv", "rebuild", "-volumes", ",".join(names), "-db", db,
                    "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), *extra, *dirs], what)
    finally:
        if env_before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_before


def empty_pg(url: str) -> None:
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DROP TABLE IF EXISTS minikv_keys, minikv_leases, minikv_schema")
        finally:
            await conn.close()

    asyncio.run(drop())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the folder the files are written into once, and kept")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--base", type=Path, help="another checkout (e.g. `git archive main`), run beside this one")
    ap.add_argument("--go-src", help="a checkout of github.com/geohot/minikeyvalue")
    ap.add_argument("--go-bin")
    ap.add_argument("--pg", help="a PostgreSQL URL to rebuild into too (its minikv tables are dropped first)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip", default="", help="steps to skip, comma separated: floor,http,local,go")
    opts = ap.parse_args()
    skip = set(opts.skip.split(","))
    dirs, names = data(opts)
    tmp = Path(tempfile.mkdtemp(prefix="minikv-bench-rebuild-", dir="/tmp"))
    cluster = Cluster(tmp)
    results: list[tuple[str, dict]] = []
    try:
        for name, d in zip(names, dirs):
            start_volume(cluster, tmp, name, d)
        if "floor" not in skip:
            r = find_floor(dirs)
            print(f"bench: find: {r['seconds']:.1f} s", file=sys.stderr)
            results.append(("floor: `find -printf` size and mtime of every file, 3 processes", r))
            r = scan_floor(dirs)
            print(f"bench: scandir + stat: {r['seconds']:.1f} s, {r['files']:,} files", file=sys.stderr)
            results.append(("floor: Python scandir + lstat of every file, 2 processes", r))
        checkouts = ([("main", opts.base)] if opts.base else []) + [("this", ROOT)]
        for i in range(opts.rounds):
            for label, src in checkouts:
                if "http" not in skip:
                    results.append((f"{label}: rebuild over HTTP", rebuild(
                        src, names, str(tmp / f"{label}-http-{i}"), [], f"{label} rebuild over HTTP")))
                if "local" not in skip:
                    results.append((f"{label}: rebuild from the local folders", rebuild(
                        src, names, str(tmp / f"{label}-local-{i}"), dirs, f"{label} rebuild (local)")))
                for db in tmp.glob(f"{label}-*-{i}"):
                    shutil.rmtree(db)  # the page cache is the machine's: keep it for the files
        if "go" not in skip:
            go, why = find_go(opts, tmp)
            if go:
                results.append(("Go original: rebuild over HTTP", run(
                    [str(go), "-volumes", ",".join(names), "-db", str(tmp / "go"), "-replicas", str(REPLICAS),
                     "-subvolumes", str(SUBVOLUMES), "rebuild"], "Go rebuild")))
            else:
                print(f"bench: Go original skipped: {why}", file=sys.stderr)
        if opts.pg:  # its password from PGPASSWORD (or ~/.pgpass), not the URL: argv is public
            empty_pg(opts.pg)
            try:
                results.append(("this: rebuild from the local folders into PostgreSQL", rebuild(
                    ROOT, names, opts.pg, dirs, "this rebuild (local) into PostgreSQL")))
            except SystemExit as e:
                print(e, file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{opts.keys:,} keys, 3 volumes, {machine()}\n")
    print("| step | time | keys/s | peak RSS (anonymous) |\n|---|---|---|---|")
    for what, r in results:
        rss = f"{r['rss_mb']:.0f} MB ({r['anon_mb']:.0f} MB)" if "rss_mb" in r else ""
        print(f"| {what} | {r['seconds']:.1f} s | {opts.keys / r['seconds']:,.0f} | {rss} |")
    for what, r in results:
        if r.get("summary"):
            print(f"- {what}: `{r['summary']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
