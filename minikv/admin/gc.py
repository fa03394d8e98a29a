"""`minikv gc -volumes ... -db ... [-age 1h] [-uploads-older-than 168h] [-delete-orphans] [VOLUME_DIR ...]`:
take out the trash.

- UNLINKED keys written more than -age ago: their files are deleted and the record dropped,
  exactly as the server's DELETE does (record → PENDING(delete) → delete every copy → gone; a
  copy that cannot be deleted leaves the key UNLINKED for the next run). The age counts from
  the write: a record keeps no time of unlinking.
- PENDING records whose owner process is dead (a crashed server or admin command): resolved by
  index/recovery.py. Records of live processes are never touched.
- with -delete-orphans: files no record names, older than -age (admin/orphans.py).
- S3 multipart uploads started more than -uploads-older-than ago (7 days by default): aborted
  with their parts, and parts whose upload is gone are deleted (admin/uploads.py).
- nginx's upload spool: files in VOLUME_DIR/body_temp older than -age (and never younger than
  SPOOL_MIN_AGE: nginx touches an upload's file only as its buffer fills, minutes apart for a
  slow client, and removing it fails that upload), for each volume directory given (this part
  needs the volumes' disks, so run gc on their machine). nginx removes its temp files itself;
  only a killed nginx leaves some behind.
- empty folders below `<aa>/<bb>/` in those volume directories, as old as the spool's. A key whose
  base64 name holds "/" has its file in folders of its own, which its DELETE leaves behind
  (the index never deletes a folder through nginx: a WebDAV DELETE of a folder is recursive,
  and could take a file another key's PUT just put there). Such a folder can block a key whose
  file name it is (the PUT answers 409 and says so). os.rmdir removes only an empty folder, so
  a file that lands meanwhile is never lost.
`-dry-run` reports what would go.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import sys
import time

from minikv import replicas
from minikv.admin.common import (
    command_main,
    each_record,
    foreign_names,
    open_index,
    resolve_stale,
    show,
    stop_on_signal,
)
from minikv.admin.orphans import Orphans
from minikv.admin.progress import Progress
from minikv.admin.uploads import clean_uploads
from minikv.admin.walk import SUBVOLUME, Walker
from minikv.http.client import Pool
from minikv.index.record import (
    LIVE,
    OP_DELETE,
    UNLINKED,
    decode_composite,
    decode_data,
    decode_pending,
    encode_pending,
    is_composite,
    now_ms,
    with_state,
)
from minikv.index.recovery import owner_alive
from minikv.index.store import Store
from minikv.s3.composite import manifest_key, part_key
from minikv.volume.nginx import BODY_TEMP, walk_folders

SPOOL_MIN_AGE = 600.0  # seconds: an upload in flight at 1 KiB/s fills nginx's 256 KB buffer in 256 s


class Collect:
    def __init__(self, store: Store, pool: Pool, progress: Progress, age: float, dry_run: bool):
        self.store = store
        self.pool = pool
        self.progress = progress
        self.cutoff = now_ms() - int(age * 1000)
        self.dry_run = dry_run

    async def key(self, key: bytes, raw: bytes) -> None:
        p = self.progress
        p.add("seen")
        if raw[0] != UNLINKED:
            return
        record = decode_data(raw)
        if record.mtime_ms > self.cutoff:
            p.add("young")
            return
        if self.dry_run:
            p.add("deleted")
            p.add("files", 0 if is_composite(raw) else len(record.volumes))
            return
        if is_composite(raw):
            return await self._composite(key, raw)
        pending = encode_pending(OP_DELETE, os.getpid(), now_ms(), record.volumes, raw)
        done, _ = self.store.cas(key, raw, pending)
        if not done:
            p.add("busy")  # written, deleted or undeleted meanwhile
            return
        failed = await replicas.delete_all(self.pool, record.volumes, key)
        if failed:
            self.store.cas(key, pending, raw)  # still UNLINKED: deleted again by the next run
            p.add("failed")
            p.problem(f"{show(key)}: not deleted: {'; '.join(failed)}")
            return
        self.store.cas(key, pending, None)
        p.add("deleted")
        p.add("files", len(record.volumes))
        p.show(deleted=p.counts["deleted"])


    async def _composite(self, key: bytes, raw: bytes) -> None:
        """An unlinked S3 multipart object (s3/composite.py): its record goes, and its manifest
        then its parts are unlinked and deleted as unlinked keys are (one that cannot be deleted
        now, or is younger than -age, stays UNLINKED for the next run: nothing refers to it)."""
        pending = encode_pending(OP_DELETE, os.getpid(), now_ms(), [], raw)
        done, _ = self.store.cas(key, raw, pending)
        if not done:
            self.progress.add("busy")
            return
        upload_id, numbers = decode_composite(raw)
        held = False
        for part in [manifest_key(upload_id)] + [part_key(upload_id, n) for n in numbers]:
            found = self.store.get(part)
            if found is not None and found[0] == LIVE and self.store.cas(part, found, with_state(found, UNLINKED))[0]:
                found = with_state(found, UNLINKED)
            if found is not None and found[0] == UNLINKED:
                await self.key(part, found)
            elif found is not None:  # locked (a rebalance or repair moving it): it would stay for ever
                held = True
        if held:  # the object stays UNLINKED, for the next run to finish
            self.store.cas(key, pending, raw)
            self.progress.add("busy")
            return
        self.store.cas(key, pending, None)
        self.progress.add("deleted")


def clean_spool(directory: str, age: float, dry_run: bool, progress: Progress) -> None:
    """Remove files older than `age` seconds from a volume directory's body_temp. The volume's
    folders belong to nginx's workers' user, who could make body_temp (or a folder in it) a
    link to a folder of root's: nothing is followed, each file is removed through the folder
    it was found in."""
    spool = os.path.join(directory, BODY_TEMP)
    try:
        top = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        progress.add("failed")
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            progress.problem(f"{spool} is a symlink or not a folder: not cleaned (remove it; minikv volume makes it)")
        else:
            progress.problem(f"{directory} is not a volume directory (cannot open its {BODY_TEMP} folder: "
                             f"{e.strerror})")
        return
    cutoff = time.time() - age
    try:
        def unreadable(path: str, e: OSError) -> None:
            progress.add("failed")
            progress.problem(f"cannot read {os.path.join(spool, path)}: {e.strerror}; its files are left")

        for root, fd, files in walk_folders(top, onerror=unreadable):
            for name in files:
                path = os.path.normpath(os.path.join(spool, root, name))
                try:
                    if os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(name, dir_fd=fd)
                    progress.add("temp files")
                except FileNotFoundError:
                    continue  # nginx finished with it meanwhile
                except OSError as e:
                    progress.add("failed")
                    progress.problem(f"cannot remove {path}: {e.strerror}")
    finally:
        os.close(top)


_HEX2 = re.compile(r"[0-9a-f]{2}")


def _dirs(path: str, pattern: re.Pattern | None = None) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)
                    and (pattern is None or pattern.fullmatch(e.name))]
    except OSError:
        return []


def clean_folders(directory: str, age: float, dry_run: bool, progress: Progress) -> None:
    """Remove the empty folders older than `age` seconds below `<aa>/<bb>/` of a volume
    directory (and of its subvolumes)."""
    cutoff = time.time() - age
    for root in [directory, *_dirs(directory, SUBVOLUME)]:
        for aa in _dirs(root, _HEX2):
            for bb in _dirs(aa, _HEX2):
                for folder in _dirs(bb):
                    _prune(folder, cutoff, dry_run, progress)


def _prune(top: str, cutoff: float, dry_run: bool, progress: Progress) -> bool:
    """Remove `top` if it holds nothing but folders that are removed: True when it is (or, with
    dry_run, would be) gone. Its folders are read first, then taken children before parents:
    a stack, not recursion, since a Go key's chain can be over a thousand folders deep."""
    order: list[tuple[str, bool, list[tuple[str, bool]] | None]] = []  # each folder after its parent
    todo = [top]
    while todo:
        folder = todo.pop()
        try:
            old = os.lstat(folder).st_mtime < cutoff  # before its subfolders go, which touches it
            with os.scandir(folder) as it:
                entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError:
            order.append((folder, False, None))
            continue
        order.append((folder, old, entries))
        todo += [path for path, is_dir in entries if is_dir]
    gone: set[str] = set()
    for folder, old, entries in reversed(order):
        if entries is None or not old or not all(is_dir and path in gone for path, is_dir in entries):
            continue
        if not dry_run:
            try:
                os.rmdir(folder)  # only ever an empty folder: a file put there meanwhile stays
            except OSError:
                continue
        progress.add("folders")
        gone.add(folder)
    return top in gone


async def gc(args, config) -> int:
    store = open_index(config, "gc")
    if store is None:
        return 2
    pool = config.pool()
    try:
        if args.delete_orphans and (why := foreign_names(store, config)):
            print(f"minikv gc: {why}", file=sys.stderr)
            return 2
        progress = Progress("gc", total=store.count())
        if args.dry_run:
            progress.add("stale", sum(1 for _, raw in store.pending_records()
                                      if not owner_alive(*decode_pending(raw)[1:3])))
        else:
            progress.add("stale", await resolve_stale(store, pool))
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        job = Collect(store, pool, progress, args.age, args.dry_run)
        await each_record(store, job.key, args.concurrency, progress, stop)
        if not stop.is_set():
            await clean_uploads(config, store, pool, args.uploads_older_than, args.dry_run, progress)
        local_age = max(args.age, SPOOL_MIN_AGE)
        for directory in args.positionals:
            clean_spool(directory, local_age, args.dry_run, progress)
            if os.path.isdir(os.path.join(directory, BODY_TEMP)):
                clean_folders(directory, local_age, args.dry_run, progress)
        if args.delete_orphans and not stop.is_set():
            progress.close()
            walk = Progress("gc orphans", total=256, bar_unit="dirs")
            walker = Walker(pool, config.volumes, args.concurrency)
            orphans = Orphans(store, pool, walk, delete=not args.dry_run, min_age_ms=int(args.age * 1000))
            await walker.walk(await walker.roots(), orphans.handle, walk.tick, stop)
            walk.close()
            progress.counts.update(walk.counts)
            for err in walker.errors:
                progress.add("failed")
                progress.problem(f"orphan search incomplete: {err}")
        dry = " (dry run)" if args.dry_run else ""
        progress.summary([("seen", "keys seen"), ("deleted", f"unlinked keys deleted{dry}"), ("failed", "failed"),
                          ("files", "files"), ("young", "unlinked keys younger than -age"),
                          ("stale", "stale locks resolved"), ("temp files", f"temp files removed{dry}"),
                          ("folders", f"empty folders removed{dry}"),
                          ("uploads aborted", f"multipart uploads aborted{dry}"), ("parts deleted", "their parts"),
                          ("orphan parts", f"orphan parts deleted{dry}"),
                          ("orphans", "orphan files"), ("orphans deleted", "orphans deleted"),
                          ("busy", "busy")])
        if stop.is_set():
            return 130
        return 1 if progress.counts["failed"] else 0
    finally:
        pool.close()
        store.close()


main = command_main("gc", gc)
