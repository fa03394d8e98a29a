"""The admin commands at scale, side by side with the Go minikeyvalue: N keys' files written
straight into volume folders (minikeyvalue's layout: 3 replicas on 3 volumes, 10 subvolumes),
then each command timed as its own process, with keys/s and peak RSS; and the index itself at
scale (bytes per key, `?list`).

    .venv/bin/python bench/scale.py [--keys 1000000] [--index-keys 1000000] [--go-src DIR]
                                    [--value-size 1024] [--out BENCHMARKS.md]

Steps, all on loopback in a fresh folder under /tmp, removed at the end. The files part
(--keys N; 0 skips it):
 1. write the files of N keys into the first 3 of 4 volume folders (two processes), start 4
    `minikv volume`s on them;
 2. rebuild over HTTP (3 volumes): minikv, then the Go original;
 3. rebuild from the local folders (minikv only: the Go original has no such mode);
 4. rebalance 3 → 4 volumes (minikv, offline, on its rebuilt index); then the Go original
    rebuilds its index on the 4 volumes and rebalances 4 → 3: the same keys move (those whose
    placement differs between the two layouts), in the other direction;
 5. minikv rebuilds on 3 volumes again (now where the Go original left the files), and so does
    the Go original (both on folders churned by the two rebalances); then verify (sizes, no
    md5), gc and a full `?list` walk on minikv's index.
The index part (--index-keys N; 0 skips it): an index of N records shaped as rebuild writes
them, made without files (the index does not care where the bytes are): its size per key, a
full `?list` walk, and one page's time at N keys against the same at 10,000.

The Go original: its source from github.com/geohot/minikeyvalue (any checkout; --go-src, or
$MKV_GO_SRC), built with Debian's golang-go and its golang-github-syndtr-goleveldb-dev and
golang-github-google-uuid-dev packages in GOPATH mode (see build_go). Or a built binary with
--go-bin. Without either, its columns are skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from admin import HOST, Cluster, machine, publish, sample_memory, wait_port  # noqa: E402

from minikv.http.client import Pool  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2path, key2volume  # noqa: E402

REPLICAS = 3
SUBVOLUMES = 10
BEGIN, END = "<!-- admin-scale:begin -->", "<!-- admin-scale:end -->"
UNLINKED_EVERY = 10  # one record in ten of the synthetic index is UNLINKED
IBEGIN, IEND = "<!-- admin-index:begin -->", "<!-- admin-index:end -->"
GOPATH_SYSTEM = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their source
GO_FILES = ("lib.go", "main.go", "rebalance.go", "rebuild.go", "s3api.go", "server.go")


# ---------------------------------------------------------------- the data


def key_of(i: int) -> bytes:
    return b"/scale/%010d" % i


def write_part(dirs: list[str], names: list[str], lo: int, hi: int, value: bytes) -> None:
    """Write the files of keys lo..hi-1 where placement puts them on `names` (folders `dirs`)."""
    where = dict(zip(names, dirs))
    for i in range(lo, hi):
        key = key_of(i)
        path = key2path(key)
        for volume in key2volume(key, names, REPLICAS, SUBVOLUMES):
            host, sub = volume.split("/")
            file = f"{where[host]}/{sub}{path}"
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(file), exist_ok=True)
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)


def write_files(dirs: list[str], names: list[str], n: int, value: bytes, procs: int) -> float:
    """Write n keys' files in `procs` processes; keys/s."""
    start = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    step = -(-n // procs)
    workers = [ctx.Process(target=write_part, args=(dirs, names, lo, min(n, lo + step), value))
               for lo in range(0, n, step)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise SystemExit(f"bench: writing the files failed (exit {w.exitcode})")
    rate = n / (time.monotonic() - start)
    print(f"bench: {rate:,.0f} keys/s written", file=sys.stderr)
    settle("the files")
    return rate


def settle(what: str) -> None:
    """Have the kernel write back what is dirty now, not during the first timed command: right
    after writing 300,000 keys' files and starting the volumes (which give their folders to
    nginx's user), a rebuild over HTTP took 31 s; the next ones, and one after a sync, 19-21 s."""
    start = time.monotonic()
    os.sync()
    print(f"bench: sync after {what}: {time.monotonic() - start:.1f} s", file=sys.stderr)


# ---------------------------------------------------------------- the Go original


def build_go(src: Path, out: Path) -> Path:
    """Build the Go original from a checkout `src` (its src/*.go) into `out`, GOPATH mode: the
    package in a temporary GOPATH, its two dependencies from Debian's packages."""
    gopath = out / "gopath"
    pkg = gopath / "src" / "mkv"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in GO_FILES:
        shutil.copy(src / "src" / name, pkg / name)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOPATH_SYSTEM}",
           "GOCACHE": str(out / "cache"), "GOFLAGS": ""}
    binary = out / "mkv"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=pkg, env=env, check=True,
                   capture_output=True, timeout=600)
    return binary


def find_go(opts, tmp: Path) -> tuple[Path | None, str]:
    """The Go binary, or None and why not."""
    if opts.go_bin:
        return (Path(opts.go_bin), "") if os.access(opts.go_bin, os.X_OK) else (None, f"{opts.go_bin} is not executable")
    src = opts.go_src or os.environ.get("MKV_GO_SRC", "")
    if not src:
        return None, "no Go source given (--go-src DIR of a minikeyvalue checkout, or --go-bin)"
    if not shutil.which("go"):
        return None, "no `go` on PATH (apt-get install golang-go golang-github-syndtr-goleveldb-dev " \
                     "golang-github-google-uuid-dev)"
    try:
        return build_go(Path(src), tmp / "go"), ""
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return None, f"building the Go original failed: {e} {detail.decode(errors='replace')[-500:]}"


# ---------------------------------------------------------------- running and measuring


def group_cpu(groups: list[int]) -> float:
    """CPU seconds used so far by the live processes of the process groups `groups` (the
    volumes': their nginx workers do the work of a rebalance, and are no child of the command)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


VOLUME_GROUPS: list[int] = []  # the volumes' process groups, whose CPU run() counts too


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq and softirq of
    /proc/stat; not idle, iowait or the hypervisor's steal): beside ours and the volumes', it
    shows what else a command made the kernel do (writeback, its threads) or what other load
    shared the cores."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def parts(r: dict) -> str:
    """The largest child process's peak RSS (a walk's parts), when there were children."""
    anon, file = r["child_mb"]
    return f"; its largest child {anon:.0f} MB anonymous + {file:.0f} MB file-backed" if anon or file else ""


def run(argv: list[str], what: str, check: bool = True, cwd: Path = ROOT) -> dict:
    """Run one command to its end; wall time, peak RSS (MB, wait4: the largest of it and its
    children), its summary line, and the CPU time of the volumes meanwhile. The disk is settled
    first (as settle does): what was written before it, the files, the folders the volumes gave
    nginx's user at their start, the command before, is not this one's to write back."""
    os.sync()
    vol_cpu = group_cpu(VOLUME_GROUPS)
    busy = machine_busy()
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=cwd)
    peak: dict = {}
    done = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    try:
        stderr = proc.stderr.read().decode(errors="replace")
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        done.set()
        sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    summary = next((line for line in stderr.splitlines() if re.match(r"^\w+: \d+ ", line)), "")
    if check and code != 0:
        raise SystemExit(f"bench: {what} exited {code}:\n{stderr[-3000:]}")
    result = {"seconds": elapsed, "rss_mb": usage.ru_maxrss / 1024, "anon_mb": peak.get("RssAnon", 0) / 1024,
              "child_mb": (peak.get("child RssAnon", 0) / 1024, peak.get("child RssFile", 0) / 1024),
              "summary": summary, "code": code, "cpu": usage.ru_utime + usage.ru_stime,
              "vol_cpu": group_cpu(VOLUME_GROUPS) - vol_cpu, "busy": machine_busy() - busy}
    print(f"bench: {what}: {elapsed:.1f} s, {result['cpu']:.1f} s of CPU (the volumes "
          f"{result['vol_cpu']:.1f} s, the machine {result['busy']:.1f} s), peak RSS {result['rss_mb']:.0f} MB "
          f"({result['anon_mb']:.0f} MB anonymous{parts(result)})  {summary}", file=sys.stderr)
    return result


def minikv(*argv: str, python: str = sys.executable, profile: Path | None = None) -> list[str]:
    """The command line of `minikv argv...`; under cProfile (its stats written to `profile`) if given."""
    return [python, *(["-m", "cProfile", "-o", str(profile)] if profile else []), "-m", "minikv", *argv]


def count(summary: str, label: str) -> int:
    m = re.search(r"(\d+) " + re.escape(label), summary)
    return int(m.group(1)) if m else 0


async def list_walk(port: int, page: int = 1000) -> tuple[int, float, list[float]]:
    """Every key through `?list` pages: (keys, seconds, the time of each page)."""
    pool = Pool(timeout=60.0)
    n, times, start_key = 0, [], ""
    from urllib.parse import quote

    begin = time.monotonic()
    try:
        while True:
            t = time.monotonic()
            path = f"/?list&limit={page}" + (f"&start={quote(start_key, safe='')}" if start_key else "")
            resp = await pool.request(f"{HOST}:{port}", "GET", path)
            times.append(time.monotonic() - t)
            if resp.status != 200:
                raise SystemExit(f"bench: ?list answered {resp.status}: {resp.body[:200]!r}")
            body = json.loads(resp.body)
            n += len(body["keys"])
            start_key = body.get("next", "")
            if not start_key:
                return n, time.monotonic() - begin, times
    finally:
        pool.close()


def pages(keys: int) -> dict[str, str]:
    """The listings timed page by page, each of 1,000 keys, in an index of `keys` records: the
    API's `?list` and S3's ListObjectsV2 of the bucket the keys are in from the middle of the
    index, `?unlinked` from its start (a full page of it reads 10,000 records, one in ten
    unlinked: at 10,000 keys from the middle it would end early)."""
    from urllib.parse import quote

    start_key = key_of(keys // 2).decode()
    bucket, _, rest = start_key.lstrip("/").partition("/")
    return {
        "`?list`": f"/?list&limit=1000&start={quote(start_key, safe='')}",
        "`?unlinked`": "/?unlinked&limit=1000",
        # list-type=2 alone makes it S3's (s3/detect.py); no keys are set, so it needs no signature
        "S3 ListObjectsV2": f"/{bucket}?list-type=2&max-keys=1000&start-after={quote(rest, safe='')}",
    }


async def page_time(port: int, path: str, tries: int = 50) -> float:
    """Median time of one page `path` (asked `tries` times)."""
    pool = Pool(timeout=60.0)
    try:
        times = []
        for _ in range(tries):
            t = time.monotonic()
            resp = await pool.request(f"{HOST}:{port}", "GET", path)
            times.append(time.monotonic() - t)
            assert resp.status == 200, (path, resp.status, resp.body[:300])
        return sorted(times)[len(times) // 2]
    finally:
        pool.close()


def small_index(src: Path, dst: Path, n: int) -> None:
    """An index holding the first n records of `src`."""
    a, b = Store(str(src)), Store(str(dst))
    try:
        pairs, _ = a.scan(b"", b"", n)
        b.merge_many(pairs, lambda key, current, new: new)
    finally:
        a.close()
        b.close()


def index_size(db: Path) -> dict:
    """The LMDB file's size and the pages in use (the file can hold freed pages)."""
    store = Store(str(db))
    try:
        with store.env.begin() as txn:
            stat = txn.stat(store.keys)
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return {"file": (db / "data.mdb").stat().st_size, "used": pages * stat["psize"], "entries": stat["entries"]}
    finally:
        store.close()


def synthetic_index(db: Path, names: list[str], n: int, size: int) -> float:
    """An index of n records shaped as a rebuild writes them (3 replicas on `names`), one in
    UNLINKED_EVERY of them unlinked (for `?unlinked` pages), made without any file: what the index
    costs does not depend on where the bytes are. Keys/s."""
    from minikv.admin.rebuild import make_record
    from minikv.admin.walk import Found
    from minikv.config import Config
    from minikv.index.record import UNLINKED, with_state

    config = Config(volumes=names, db=str(db), replicas=REPLICAS, subvolumes=SUBVOLUMES)
    store = Store(str(db))
    order = list(range(n))
    random.Random(1).shuffle(order)  # written in no key order, as PUTs and rebuild write them
    start = time.monotonic()
    try:
        batch = []
        for i in order:
            key = key_of(i)
            found = [Found(v, size, 1_700_000_000_000) for v in key2volume(key, names, REPLICAS, SUBVOLUMES)]
            raw = make_record(key, found, config)[0]
            batch.append((key, with_state(raw, UNLINKED) if i % UNLINKED_EVERY == 0 else raw))
            if len(batch) == 10_000:
                store.merge_many(batch, lambda key, current, new: new)
                batch = []
        store.merge_many(batch, lambda key, current, new: new)
    finally:
        store.close()
    return n / (time.monotonic() - start)


def index_part(tmp: Path, cluster: Cluster, vols: list[str], n: int, value_size: int, postgres: bool) -> dict:
    """Size per key, a full `?list` walk and each listing's page time, at n keys and at 10,000;
    with `postgres` the same index copied into PostgreSQL (copy-index), its size and pages too."""
    out: dict = {"n": n}
    db = tmp / "synthetic"
    print(f"bench: an index of {n:,} records ...", file=sys.stderr)
    synthetic_index(db, vols, n, value_size)
    out["size"] = index_size(db)
    small = tmp / "small"
    small_index(db, small, min(n, 10_000))
    pg = start_pg(tmp) if postgres else None
    try:
        for engine in ("lmdb", "pg") if pg else ("lmdb",):
            for label, path, keys in (("big", db, n), ("small", small, min(n, 10_000))):
                if engine == "pg":
                    url = pg_database(pg, f"{label}_index")
                    out[f"copy_{label}"] = run(minikv("copy-index", str(path), url), f"copy-index of {keys:,} records")
                    if label == "big":
                        out["pg_size"] = pg_size(url)
                    path = url
                cluster.db = path
                cluster.start_index(vols)
                try:
                    if label == "big":
                        got, seconds, times = asyncio.run(list_walk(cluster.port))
                        assert got == n - (n + UNLINKED_EVERY - 1) // UNLINKED_EVERY, (got, n)
                        out[f"{engine} walk"] = seconds
                        out[f"{engine} walk_max_page"] = max(times[1:] or times)  # the first one also connects
                    for kind, page in pages(keys).items():
                        out[f"{engine} {kind} {label}"] = asyncio.run(page_time(cluster.port, page))
                finally:
                    cluster.stop_index()
    finally:
        if pg is not None:
            pg.stop()
    print(f"bench: ?list: {out['lmdb walk']:.1f} s for {n:,} keys; {out['size']['file'] / n:.0f} bytes per key; "
          + "; ".join(f"{k} {v * 1000:.2f} ms" for k, v in out.items() if k.endswith((" big", " small"))),
          file=sys.stderr)
    return out


def start_pg(tmp: Path):
    """A PostgreSQL of the run's own (minikv/pg_local.py: its unix socket only)."""
    from minikv.pg_local import LocalPostgres

    pg = LocalPostgres(tmp / "postgres")
    if why := pg.problem():
        raise SystemExit(f"bench: --postgres: {why}")
    pg.init()
    pg.start()
    return pg


def pg_database(pg, name: str) -> str:
    """A new empty database `name` in `pg`; its URL."""
    import asyncpg

    async def make() -> None:
        conn = await asyncpg.connect(pg.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(make())
    return pg.url().replace("/postgres?", f"/{name}?")


def pg_size(url: str) -> dict:
    """The keys table's size on disk: the table with its TOAST, and its indexes."""
    import asyncpg

    async def measure() -> dict:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE minikv_keys")
            row = await conn.fetchrow("SELECT pg_table_size('minikv_keys') AS t, pg_indexes_size('minikv_keys') AS i, "
                                      "count(*) AS n FROM minikv_keys")
            return {"table": row["t"], "indexes": row["i"], "rows": row["n"]}
        finally:
            await conn.close()

    return asyncio.run(measure())


def command(opts) -> str:
    """The command line that makes these figures (a Go source folder shown as DIR)."""
    go = " --go-src DIR" if opts.go_src or os.environ.get("MKV_GO_SRC") else " --go-bin BIN" if opts.go_bin else ""
    return (f".venv/bin/python bench/scale.py --keys {opts.keys} --index-keys {opts.index_keys}{go} "
            f"--value-size {opts.value_size} --concurrency {opts.concurrency}{' --postgres' if opts.postgres else ''} "
            "--out BENCHMARKS.md")


def index_table(opts, res: dict) -> str:
    n, size, value_size = res["n"], res["size"], opts.value_size
    small = min(n, 10_000)
    per_key = size["file"] / n
    pg = "pg_size" in res
    rows = [
        f"| index on disk | {size['file'] / 2**20:,.0f} MB (data.mdb): {per_key:.0f} bytes per key; pages in use "
        f"{size['used'] / 2**20:,.0f} MB, {size['used'] / n:.0f} bytes per key |",
        f"| a billion such keys | about {per_key * 1e9 / 2**30:,.0f} GiB |",
    ]
    if pg:
        ps = res["pg_size"]
        pg_key = (ps["table"] + ps["indexes"]) / n
        rows[0] += (f" {(ps['table'] + ps['indexes']) / 2**20:,.0f} MB: {pg_key:.0f} bytes per key (table "
                    f"{ps['table'] / n:.0f}, its indexes {ps['indexes'] / n:.0f}) |")
        rows[1] += f" about {pg_key * 1e9 / 2**30:,.0f} GiB |"
        copy = res["copy_big"]
        rows.append(f"| `minikv copy-index` of the {n:,} records, LMDB → PostgreSQL | | {copy['seconds']:.1f} s "
                    f"({n / copy['seconds']:,.0f} records/s), peak RSS {copy['rss_mb']:.0f} MB |")
    for kind in pages(n):
        for label, keys in (("big", n), ("small", small)):
            cells = " | ".join(f"{res[f'{e} {kind} {label}'] * 1000:.2f} ms" for e in (("lmdb", "pg") if pg else ("lmdb",)))
            rows.append(f"| {kind} page of 1,000 keys (median of 50) at {keys:,} keys | {cells} |")
    walks = " | ".join(f"{res[f'{e} walk']:.1f} s ({n / res[f'{e} walk']:,.0f} keys/s), slowest page after the "
                       f"first {res[f'{e} walk_max_page'] * 1000:.1f} ms" for e in (("lmdb", "pg") if pg else ("lmdb",)))
    rows.append(f"| full `?list` walk in pages of 1,000 | {walks} |")
    return "\n".join([
        IBEGIN,
        "## The index at scale: size per key and listings",
        "",
        f"An index of {n:,} records shaped as `rebuild` writes them ({REPLICAS} replicas on 3 volumes "
        f"with {SUBVOLUMES} subvolumes, values of {value_size:,} bytes, keys like `/scale/0000123456`, one in "
        f"{UNLINKED_EVERY} UNLINKED), served by `minikv server` with its default workers"
        + (", in LMDB and, copied there by `minikv copy-index`, in PostgreSQL (its own instance of the run, "
           "default settings, unix socket)" if pg else "")
        + f". Pages start in the middle of the index (`?unlinked`: at its start). Written by `{command(opts)}` ({machine()}).",
        "",
        "| measure | LMDB |" + (" PostgreSQL |" if pg else ""),
        "|---|---|" + ("---|" if pg else ""),
        *rows,
        IEND,
    ])


# ---------------------------------------------------------------- the run


def rate(n: int, r: dict | None) -> str:
    return f"{n / r['seconds']:,.0f}" if r else "–"


def floor_lines(n: int, res: dict) -> list[str]:
    """What the machine allows whatever the client: the volumes' nginx CPU a command caused,
    spread over every core, is the least time any program sending the same requests could take;
    and the file system's own walk (`find`, a scandir with a stat per file) for the local rebuild."""
    cores = os.cpu_count() or 1
    go = res.get("go", {})
    lines = []
    for what, key in (("rebuild over HTTP", "rebuild"), ("rebalance", "rebalance"), ("verify", "verify")):
        ours, theirs = res[key], go.get(key)
        bound = ours["vol_cpu"] / cores
        line = (f"- {what}: the volumes' nginx spent {ours['vol_cpu']:.1f} CPU-s on our requests (ours "
                f"{ours['cpu']:.1f} CPU-s of its own), so no client sending them could finish in under "
                f"{bound:.1f} s on {cores} cores ({n / max(bound, 1e-3):,.0f} keys/s)")
        if theirs:
            line += (f"; the Go original's requests cost nginx {theirs['vol_cpu']:.1f} CPU-s (Go {theirs['cpu']:.1f} "
                     f"CPU-s of its own): a free client at that floor would be "
                     f"{theirs['seconds'] / max(bound, 1e-3):.2f}× the Go original")
        lines.append(line + ".")
    fl = res.get("floors", {})
    if "find warm" in fl:
        find, scan = fl["find warm"], fl["scandir warm"]
        lines.append(f"- rebuild from the local folders: `find -type f` over the same folders (no stat, warm "
                     f"caches) took {find['seconds']:.2f} s ({n / find['seconds']:,.0f} keys/s), a Python scandir "
                     f"walk with a stat per file {scan['seconds']:.2f} s ({n / scan['seconds']:,.0f} keys/s); "
                     f"first runs {fl['find first']['seconds']:.2f} s and {fl['scandir first']['seconds']:.2f} s.")
        cores = os.cpu_count() or 1
        both, pys = fl["find with a stat, all cores"], fl["scandir, all cores"]
        lines.append(f"- the same on {cores} cores with the stat a rebuild needs (one process per core, no index "
                     f"work): `find -printf %s` {both['seconds']:.2f} s ({n / both['seconds']:,.0f} keys/s, "
                     f"{both['cpu']:.1f} CPU-s), the Python scandir walk {pys['seconds']:.2f} s "
                     f"({n / pys['seconds']:,.0f} keys/s, {pys['cpu']:.1f} CPU-s).")
    return lines


def table(opts, n: int, res: dict) -> str:
    rows = []
    go = res.get("go", {})

    def cpu(r: dict) -> str:
        return f"{r['cpu']:.1f} / {r['vol_cpu']:.1f} / {r['busy']:.1f}"

    def row(what: str, ours: dict, theirs: dict | None, keys: int, extra: str = "") -> None:
        ratio = f"{(keys / ours['seconds']) / (keys / theirs['seconds']):.2f}×" if theirs else "–"
        g = f"{rate(keys, theirs)} keys/s, {theirs['rss_mb']:.0f} MB, {cpu(theirs)}" if theirs else "–"
        rows.append(f"| {what} | {ours['seconds']:.1f} s | {rate(keys, ours)} keys/s{extra} | "
                    f"{ours['rss_mb']:.0f} MB ({ours['anon_mb']:.0f} MB{parts(ours)}) | {cpu(ours)} | {g} | {ratio} |")

    row("rebuild over HTTP, 3 volumes", res["rebuild"], go.get("rebuild"), n)
    if "again" in res:
        row("rebuild over HTTP again, after both rebalances", res["again"], go.get("again"), n)
    row("rebuild from the local folders", res["local"], None, n)
    moved = count(res["rebalance"]["summary"], "moved")
    row("rebalance 3 → 4 volumes (Go: 4 → 3, the same keys)", res["rebalance"], go.get("rebalance"), n,
        f", {moved:,} moved")
    row("verify (sizes, no md5)", res["verify"], None, n)
    row("gc", res["gc"], None, n)
    lw = res["list"]
    return "\n".join([
        BEGIN,
        "## Admin commands at scale, beside the Go original",
        "",
        f"{n:,} keys of {opts.value_size:,} bytes, their files written straight into the folders of 3 volumes "
        f"({REPLICAS} replicas, {SUBVOLUMES} subvolumes; a 4th volume for the rebalance), `-concurrency "
        f"{opts.concurrency}`. keys/s counts every key of the index; peak RSS is wait4's (the largest of the "
        "command and its children), which counts the pages of the LMDB files it touched (file-backed: the page "
        "cache); in brackets the anonymous part of the main process (sampled from /proc every 20 ms), its own "
        "memory. CPU-s: the command's own (wait4, with its children) / the volumes' nginx meanwhile / the whole "
        "machine busy meanwhile (/proc/stat: with the kernel's own threads, writeback among them). "
        f"Written by `{command(opts)}` ({machine()}). {res['go_note']}",
        "",
        "| command | minikv time | minikv rate | minikv peak RSS (anonymous) | minikv CPU-s / volumes' / machine | "
        "Go original (rate, RSS, CPU-s / volumes' / machine) | minikv / Go |",
        "|---|---|---|---|---|---|---|",
        *rows,
        f"| `?list` walk, pages of 1,000 | {lw['seconds']:.1f} s | {rate(n, lw)} keys/s | | | – | – |",
        "",
        "Floors, measured in the same run:",
        "",
        *floor_lines(n, res),
        "",
        "Summaries printed by the commands:",
        "",
        *[f"- `{res[k]['summary']}`" for k in ("rebuild", "again", "local", "rebalance", "verify", "gc") if k in res],
        END,
    ])


def four_volumes(opts, tmp: Path, cluster: Cluster) -> tuple[list[str], list[str], list[str]]:
    """The files of --keys keys written into the folders of the first 3 of 4 volumes, and the 4
    volumes started on them (each gives its folders to nginx's user first); the folders, and
    the names of the first 3 volumes and of all 4."""
    dirs = [str(tmp / f"vol{i}") for i in range(4)]
    print(f"bench: writing {opts.keys:,} keys' files ...", file=sys.stderr)
    write_files(dirs[:3], cluster.names[:3], opts.keys, b"v" * opts.value_size, 2)
    for i, port in enumerate(cluster.ports):
        os.makedirs(dirs[i], exist_ok=True)
        cluster.spawn(["volume", "-host", HOST, "-port", str(port), dirs[i]], f"vol{i}.log")
    for proc, port in zip(cluster.procs, cluster.ports):
        wait_port(port, proc, "a volume", timeout=600)
    VOLUME_GROUPS[:] = [proc.pid for proc in cluster.procs]  # run() counts their CPU
    return dirs, cluster.names[:3], cluster.names


def files_part(opts, tmp: Path, cluster: Cluster) -> dict:
    """Steps 1-5 of the module docstring; the results by step."""
    res: dict = {"go": {}}
    go, why = find_go(opts, tmp)
    res["go_note"] = ("The Go original was built from its public source with Debian's packages (bench/scale.py "
                      "build_go)." if go else f"Go original skipped: {why}.")
    if not go:
        print(f"bench: {res['go_note']}", file=sys.stderr)
    dirs, three, four = four_volumes(opts, tmp, cluster)
    common = ["-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), "-concurrency", str(opts.concurrency)]
    go_flags = ["-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES)]
    db = tmp / "index"
    res["rebuild"] = run(minikv("rebuild", "-volumes", ",".join(three), "-db", str(db), *common), "minikv rebuild")
    if go:
        res["go"]["rebuild"] = run([str(go), "-volumes", ",".join(three), "-db", str(tmp / "go3"), *go_flags,
                                    "rebuild"], "Go rebuild")
    res["floors"] = floors(dirs[:3], False)
    res["local"] = run(minikv("rebuild", "-volumes", ",".join(three), "-db", str(tmp / "local"), *common,
                              *dirs[:3]), "minikv rebuild (local)")
    res["rebalance"] = run(minikv("rebalance", "-volumes", ",".join(four), "-db", str(db), *common),
                           "minikv rebalance 3 → 4")
    vols = four
    if go:
        run([str(go), "-volumes", ",".join(four), "-db", str(tmp / "go4"), *go_flags, "rebuild"],
            "Go rebuild (4 volumes)")
        res["go"]["rebalance"] = run([str(go), "-volumes", ",".join(three), "-db", str(tmp / "go4"), *go_flags,
                                      "rebalance"], "Go rebalance 4 → 3")
        db = tmp / "again"  # the files are back on 3 volumes: an index of where they are
        res["again"] = run(minikv("rebuild", "-volumes", ",".join(three), "-db", str(db), *common),
                           "minikv rebuild (again)")
        # the folders have been churned by two rebalances (creates and unlinks): the Go original
        # rebuilds from the same state, so the second rebuild has a fair ratio too
        res["go"]["again"] = run([str(go), "-volumes", ",".join(three), "-db", str(tmp / "go3again"), *go_flags,
                                  "rebuild"], "Go rebuild (again)")
        vols = three
    res["verify"] = run(minikv("verify", "-volumes", ",".join(vols), "-db", str(db), *common), "minikv verify")
    res["gc"] = run(minikv("gc", "-volumes", ",".join(vols), "-db", str(db), *common), "minikv gc")
    cluster.db = db
    cluster.start_index(vols)
    keys, seconds, _ = asyncio.run(list_walk(cluster.port))
    cluster.stop_index()
    res["list"] = {"seconds": seconds}
    print(f"bench: ?list walk: {keys:,} keys in {seconds:.1f} s", file=sys.stderr)
    return res


def ab_part(opts, tmp: Path, cluster: Cluster) -> str:
    """--old DIR: rebalance 3 → 4 and verify only, timed for the code of DIR (an older checkout
    with its own .venv), for ours and for the Go original, in one run on the same files.

    old 3 → 4 (on a copy of the index), then the files go back to 3 volumes (the Go original's
    4 → 3 when it is there, else our code's, untimed), then ours 3 → 4; verify of both on the
    index ours left. Each with its CPU time (the process's own, from wait4), which a machine busy
    with other work disturbs less than the wall time. With --profile DIR, cProfile stats of our
    rebalance and verify land there."""
    n = opts.keys
    old = Path(opts.old).resolve()
    old_py = str(old / ".venv" / "bin" / "python")
    go, why = find_go(opts, tmp)
    dirs, three, four = four_volumes(opts, tmp, cluster)
    common = ["-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), "-concurrency", str(opts.concurrency)]
    db, db_old = tmp / "index", tmp / "index-old"
    run(minikv("rebuild", "-volumes", ",".join(three), "-db", str(db), *common, *dirs[:3]), "minikv rebuild (local)")
    shutil.copytree(db, db_old)
    prof = Path(opts.profile).resolve() if opts.profile else None
    if prof:
        prof.mkdir(parents=True, exist_ok=True)
    res = {"old": run(minikv("rebalance", "-volumes", ",".join(four), "-db", str(db_old), *common, python=old_py),
                      "old rebalance 3 → 4", cwd=old)}
    if go:
        run([str(go), "-volumes", ",".join(four), "-db", str(tmp / "go4"), "-replicas", str(REPLICAS),
             "-subvolumes", str(SUBVOLUMES), "rebuild"], "Go rebuild (4 volumes)")
        res["go"] = run([str(go), "-volumes", ",".join(three), "-db", str(tmp / "go4"), "-replicas", str(REPLICAS),
                         "-subvolumes", str(SUBVOLUMES), "rebalance"], "Go rebalance 4 → 3")
    else:
        print(f"bench: Go original skipped: {why}", file=sys.stderr)
        run(minikv("rebalance", "-volumes", ",".join(three), "-db", str(db_old), *common), "back to 3 volumes")
    res["new"] = run(minikv("rebalance", "-volumes", ",".join(four), "-db", str(db), *common,
                            profile=prof / "rebalance.prof" if prof else None), "new rebalance 3 → 4")
    if not opts.rebalance_only:
        res["verify old"] = run(minikv("verify", "-volumes", ",".join(four), "-db", str(db), *common,
                                       python=old_py), "old verify", cwd=old)
        res["verify new"] = run(minikv("verify", "-volumes", ",".join(four), "-db", str(db), *common,
                                       profile=prof / "verify.prof" if prof else None), "new verify")
        res["verify local"] = run(minikv("verify", "-volumes", ",".join(four), "-db", str(db), *common, *dirs),
                                  "new verify (local)", check=False)
    lines = [f"A/B at {n:,} keys of {opts.value_size:,} bytes, -concurrency {opts.concurrency} ({machine()}):"]
    for name, r in res.items():
        lines.append(f"- {name}: {r['seconds']:.1f} s, {n / r['seconds']:,.0f} keys/s, {r['cpu']:.1f} s of CPU "
                     f"({n / r['cpu']:,.0f} keys per CPU second; the volumes {r['vol_cpu']:.1f} s), "
                     f"peak RSS {r['rss_mb']:.0f} MB"
                     + (f" ({(n / r['seconds']) / (n / res['go']['seconds']):.2f}× Go)" if "go" in res
                        and not name.startswith("verify") else "") + f"  {r['summary']}")
    return "\n".join(lines)


def floors(dirs: list[str], drop: bool) -> dict:
    """What the file system alone costs for the walk of `dirs`: `find -type f | wc -l` (no stat)
    and a Python os.scandir walk with a stat per file, each run twice (the second warm); with
    `drop` (root only) once more after dropping the dentry and inode caches (cold). Then, warm,
    the walks that do what a rebuild must (a stat per file: its size) on every core: the
    folders below `dirs` shared out among one process per core, `find -printf '%s'` (C, no
    index work at all) and the Python scandir walk: no rebuild can beat those."""
    out: dict = {}
    py = ("import os, sys\n"
          "def walk(p):\n"
          "    with os.scandir(p) as it:\n"
          "        for e in it:\n"
          "            walk(e.path) if e.is_dir(follow_symlinks=False) else e.stat(follow_symlinks=False)\n"
          "for d in sys.argv[1:]:\n"
          "    walk(d)\n")
    runs = [("find", ["sh", "-c", "find \"$@\" -type f | wc -l", "find", *dirs]),
            ("scandir", [sys.executable, "-c", py, *dirs])]
    for name, argv in runs:
        for i in range(2):
            out[f"{name} {'warm' if i else 'first'}"] = run(argv, f"floor: {name} ({'warm' if i else 'first'})")
    if drop:
        for name, argv in runs:
            Path("/proc/sys/vm/drop_caches").write_text("2\n")
            out[f"{name} cold"] = run(argv, f"floor: {name} (cold)")
    cores = os.cpu_count() or 1
    below = sorted(e.path for d in dirs for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
    shares = [below[i::cores] for i in range(cores)]

    def together(commands: list[str]) -> list[str]:
        """sh running `commands` at once, failing when one of them does (a bare `wait` would not)."""
        started = " ".join(f"{c} & p{i}=$!;" for i, c in enumerate(commands))
        return ["sh", "-c", f"{started} s=0; for p in {' '.join(f'$p{i}' for i in range(len(commands)))}; "
                            "do wait $p || s=1; done; exit $s"]

    find = [f"find {' '.join(map(shlex.quote, sh))} -type f -printf '%s\\n' >/dev/null" for sh in shares]
    scan = [f"{shlex.quote(sys.executable)} -c {shlex.quote(py)} {' '.join(map(shlex.quote, sh))}" for sh in shares]
    out["find with a stat, all cores"] = run(together(find), f"floor: find -printf %s ({cores} processes)")
    out["scandir, all cores"] = run(together(scan), f"floor: scandir ({cores} processes)")
    return out


def walk_ab(opts, tmp: Path, cluster: Cluster) -> str:
    """--old DIR --walk: the walks of the volumes only, old code against new against the Go
    original, on the same files in one run: rebuild over HTTP, rebuild from the local folders,
    verify over HTTP and from the folders (sizes, no md5); and the file system's floor (floors)."""
    n = opts.keys
    old = Path(opts.old).resolve()
    old_py = str(old / ".venv" / "bin" / "python")
    go, why = find_go(opts, tmp)
    dirs = [str(tmp / f"vol{i}") for i in range(3)]
    three = cluster.names[:3]
    print(f"bench: writing {n:,} keys' files ...", file=sys.stderr)
    write_files(dirs, three, n, b"v" * opts.value_size, 2)
    for i, port in enumerate(cluster.ports[:3]):
        cluster.spawn(["volume", "-host", HOST, "-port", str(port), dirs[i]], f"vol{i}.log")
    for proc, port in zip(cluster.procs, cluster.ports):
        wait_port(port, proc, "a volume", timeout=600)
    VOLUME_GROUPS[:] = [proc.pid for proc in cluster.procs]  # run() counts their CPU as the main run's
    common = ["-volumes", ",".join(three), "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES),
              "-concurrency", str(opts.concurrency)]
    res = {}
    sides = [("old", old_py, old), ("new", sys.executable, ROOT)]

    def rounds():
        """(label, python, cwd) of each run: old then new, then new then old, ... (--rounds)."""
        for r in range(opts.rounds):
            for label, py, cwd in (sides if r % 2 == 0 else sides[::-1]):
                yield (f"{label} #{r + 1}" if opts.rounds > 1 else label), py, cwd

    for label, py, cwd in rounds():
        res[f"rebuild over HTTP, {label}"] = run(minikv("rebuild", *common, "-db", str(tmp / f"h-{label}"), python=py),
                                                  f"{label} rebuild", cwd=cwd)
    if go:
        res["rebuild over HTTP, Go"] = run([str(go), "-volumes", ",".join(three), "-db", str(tmp / "go3"),
                                            "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), "rebuild"],
                                           "Go rebuild")
    else:
        print(f"bench: Go original skipped: {why}", file=sys.stderr)
    for label, py, cwd in rounds():
        res[f"rebuild from the folders, {label}"] = run(minikv("rebuild", *common, "-db", str(tmp / f"l-{label}"),
                                                               *dirs, python=py), f"{label} rebuild (local)", cwd=cwd)
    db = str(tmp / ("h-new #1" if opts.rounds > 1 else "h-new"))  # an index of every key, for the verifies
    for label, py, cwd in rounds():
        res[f"verify over HTTP, {label}"] = run(minikv("verify", *common, "-db", db, python=py), f"{label} verify",
                                                cwd=cwd)
        res[f"verify from the folders, {label}"] = run(minikv("verify", *common, "-db", db, *dirs, python=py),
                                                       f"{label} verify (local)", cwd=cwd)
    res.update(floors(dirs, opts.drop_caches))
    go_rate = n / res["rebuild over HTTP, Go"]["seconds"] if go else 0
    lines = [f"Walk A/B at {n:,} keys of {opts.value_size:,} bytes (3 volumes, {REPLICAS} replicas, {SUBVOLUMES} "
             f"subvolumes), -concurrency {opts.concurrency} ({machine()}):"]
    for name, r in res.items():
        ratio = f" ({n / r['seconds'] / go_rate:.2f}× Go)" if go_rate and name.startswith("rebuild over") else ""
        lines.append(f"- {name}: {r['seconds']:.1f} s, {n / r['seconds']:,.0f} keys/s{ratio}, {r['cpu']:.1f} s of "
                     f"CPU ({n / max(r['cpu'], 1e-3):,.0f} keys per CPU second), peak RSS {r['rss_mb']:.0f} MB  "
                     f"{r['summary']}")
    return "\n".join(lines)


def rebalance_ab(opts, tmp: Path, cluster: Cluster) -> str:
    """--old DIR --rebalance-rounds N: the offline rebalance only, old code against new, N rounds
    on the same files in one run, alternating (old, new, new, old, ...). Each side moves the keys
    3 → 4 volumes and then back 4 → 3 (the same keys both ways), so every run starts from the same
    layout and the disk's state drifts alike for both sides: ab_part's single old-then-new runs
    differ by more than most changes do (54.8 against 87.7 s for the same code)."""
    n = opts.keys
    old = Path(opts.old).resolve()
    sides = [("old", str(old / ".venv" / "bin" / "python"), old), ("new", sys.executable, ROOT)]
    dirs, three, four = four_volumes(opts, tmp, cluster)
    common = ["-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), "-concurrency", str(opts.concurrency)]
    # with --postgres the index is a database of a PostgreSQL of the run's own (one process a side)
    pg = start_pg(tmp) if opts.postgres else None
    try:
        db = pg_database(pg, "rebalance") if pg else str(tmp / "index")
        run(minikv("rebuild", "-volumes", ",".join(three), "-db", db, *common, *dirs[:3]), "minikv rebuild (local)")
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for r in range(opts.rebalance_rounds):
            for label, py, cwd in (sides if r % 2 == 0 else sides[::-1]):
                for there in (four, three):
                    runs[label].append(run(minikv("rebalance", "-volumes", ",".join(there), "-db", db, *common,
                                                  python=py), f"{label} #{r + 1} rebalance to {len(there)}", cwd=cwd))
    finally:
        if pg:
            pg.stop()
    index = "a PostgreSQL index" if pg else "an LMDB index"
    lines = [f"Rebalance A/B at {n:,} keys of {opts.value_size:,} bytes on {index}, 3 → 4 → 3 volumes, "
             f"{opts.rebalance_rounds} round(s), -concurrency {opts.concurrency} ({machine()}):"]
    for label, got in runs.items():
        moved = [count(r["summary"], "moved") for r in got]
        lines.append(f"- {label}: " + "; ".join(
            f"{r['seconds']:.1f} s ({m / r['seconds']:,.0f} moves/s), ours {r['cpu']:.1f} / volumes {r['vol_cpu']:.1f} "
            f"CPU-s ({r['cpu'] / max(m, 1) * 1e6:.0f} / {r['vol_cpu'] / max(m, 1) * 1e6:.0f} us a move)"
            for r, m in zip(got, moved)))
        walls = sorted(r["seconds"] for r in got)
        cpus = sorted(r["cpu"] / max(m, 1) * 1e6 for r, m in zip(got, moved))
        lines.append(f"  median {walls[len(walls) // 2]:.1f} s, our CPU {cpus[len(cpus) // 2]:.0f} us a move")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys whose files are written (0: skip)")
    ap.add_argument("--index-keys", type=int, default=1_000_000, help="records of the index part (0: skip)")
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=64)  # as the admin commands
    ap.add_argument("--go-src", help="a checkout of github.com/geohot/minikeyvalue (or $MKV_GO_SRC)")
    ap.add_argument("--go-bin", help="the Go original, built")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dir", default="/tmp", help="where the run's folder goes (/dev/shm: no disk in the figures, and "
                                                  "no minutes of deleting at the end)")
    ap.add_argument("--old", help="an older checkout (with its .venv): A/B of rebalance and verify only (ab_part)")
    ap.add_argument("--rebalance-only", action="store_true", help="with --old: leave out the verify runs")
    ap.add_argument("--rebalance-rounds", type=int, default=0,
                    help="with --old: A/B of the offline rebalance only, this many alternating rounds (rebalance_ab)")
    ap.add_argument("--profile", help="with --old: a folder for cProfile stats of our rebalance and verify")
    ap.add_argument("--walk", action="store_true", help="with --old: A/B of the walks only (rebuild, verify; walk_ab)")
    ap.add_argument("--postgres", action="store_true",
                    help="the index part in PostgreSQL too (a throwaway instance; copy-index, size, pages); with "
                         "--rebalance-rounds: the A/B on a PostgreSQL index")
    ap.add_argument("--rounds", type=int, default=1, help="with --walk: runs of each side, alternating (old new new old ...)")
    ap.add_argument("--drop-caches", action="store_true", help="with --walk, as root: the floors cold too")
    opts = ap.parse_args()
    # else they were ignored, and the run measured something else than asked
    # ab_part is the only run that reads --rebalance-only and --profile
    ab = bool(opts.old) and not opts.walk and not opts.rebalance_rounds
    for flag, given, needs, what in (
            ("--rebalance-rounds", opts.rebalance_rounds, opts.old, "--old DIR"),
            ("--walk", opts.walk, opts.old, "--old DIR"),
            ("--rebalance-only", opts.rebalance_only, ab, "--old DIR, without --walk or --rebalance-rounds"),
            ("--profile", opts.profile, ab, "--old DIR, without --walk or --rebalance-rounds"),
            ("--rounds", opts.rounds != 1, opts.walk, "--old DIR --walk"),
            ("--drop-caches", opts.drop_caches, opts.walk, "--old DIR --walk"),
            ("--postgres", opts.postgres, not opts.old or opts.rebalance_rounds,
             "no --old, or --old DIR --rebalance-rounds N")):
        if given and not needs:
            ap.error(f"{flag} needs {what}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # timed as installed (./dev compiles the package): with PYTHONDONTWRITEBYTECODE set and no
    # bytecode on disk, each command and each of its processes compiled minikv again (~0.1
    # CPU-s each; an empty rebuild took 0.7 s, not 0.3)
    compileall.compile_dir(str(ROOT / "minikv"), quiet=1)
    if opts.old:  # by the Python that runs it (its bytecode is that version's)
        old = Path(opts.old).resolve()
        subprocess.run([str(old / ".venv" / "bin" / "python"), "-m", "compileall", "-q", "minikv"], cwd=old,
                       check=False)
    tmp = Path(tempfile.mkdtemp(prefix="minikv-bench-scale-", dir=opts.dir))
    tmp.chmod(0o755)  # nginx workers run as www-data when we are root
    cluster = Cluster(tmp)
    cluster.ports = cluster.ports[:4]
    cluster.names = cluster.names[:4]
    sections = []
    try:
        if opts.old:
            print(walk_ab(opts, tmp, cluster) if opts.walk else rebalance_ab(opts, tmp, cluster)
                  if opts.rebalance_rounds else ab_part(opts, tmp, cluster))
            return 0
        if opts.keys:
            sections.append(table(opts, opts.keys, files_part(opts, tmp, cluster)))
        if opts.index_keys:
            sections.append(index_table(opts, index_part(tmp, cluster, cluster.names[:3], opts.index_keys,
                                                         opts.value_size, opts.postgres)))
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for section in sections:
        print(section)
        if opts.out:
            publish(opts.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
