"""Reading which files the volumes hold straight from their folders on this machine (scandir).

What an operator runs on a volume host (or where the index host holds the volumes too): the
same walk as admin/walk.py, `<aa>` by `<aa>`, one `<aa>/<bb>` folder across every volume at a
time, handing the caller the same `{key: [Found, ...]}` batches, but from the file system, with
no HTTP and no JSON in between. Memory holds one `<aa>/<bb>` folder, never the whole listing.

A subvolume, `<aa>` or `<bb>` folder that is a symbolic link is followed, as nginx follows it
(a subvolume moved to another disk and linked back was left out, its keys lost from the index);
below `<bb>` links are not (a link to a folder above would make the walk endless), nor links to
files (no writer of a volume makes one).

Volume folders are named on the command line as `DIR` (in the order of -volumes, one for each)
or `VOLUME=DIR` (any subset: a rebuild per volume host, each adding to the index with -force).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from minikv.admin.walk import HEX2, SUBVOLUME, Found, Root, add_copies
from minikv.placement import name2key

_new = tuple.__new__
_HEX = {b"%02x" % i: bytes((i,)) for i in range(256)}  # an `<aa>` or `<bb>` folder's name: its byte
YIELD_EVERY = 64  # `<bb>` folders between two chances for the event loop to run others


def volume_dirs(volumes: list[str], given: list[str]) -> dict[str, str]:
    """{volume: folder} from the positionals; ValueError with what to write instead."""
    if not given:
        return {}
    pairs = [g.split("=", 1) for g in given]
    named = [p for p in pairs if len(p) == 2]
    if named and len(named) != len(pairs):
        raise ValueError("give every volume folder as VOLUME=DIR, or all of them as DIR in the order of -volumes")
    if not named:
        if len(given) != len(volumes):
            raise ValueError(f"{len(given)} volume folders for {len(volumes)} volumes: give one DIR per volume "
                             "in the order of -volumes, or VOLUME=DIR for the ones on this machine")
        named = [[v, d] for v, d in zip(volumes, given)]
    out: dict[str, str] = {}
    for volume, folder in named:
        if volume not in volumes:
            raise ValueError(f"{volume} is not one of -volumes ({','.join(volumes)})")
        if volume in out:
            raise ValueError(f"{volume} is given two folders")
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} is not a folder")
        out[volume] = folder
    return out


def _is_dir(e: os.DirEntry) -> bool:
    """A folder, or a link to one (as nginx follows it); a link in a loop is neither."""
    try:
        return e.is_dir()
    except OSError:
        return False


def _entries(path: str | bytes) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


class LocalWalker:
    """Walks the volumes of `dirs` ({volume: folder}); `errors` as Walker's."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs
        self.errors: list[str] = []

    async def roots(self) -> list[Root]:
        found: list[Root] = []
        for host, folder in self.dirs.items():
            try:
                names = [e.name for e in _entries(folder) if _is_dir(e)]
            except OSError as e:  # as Walker.roots: this volume's keys are missing, said so
                self.errors.append(f"cannot read {folder}: {e.strerror}")
                continue
            found += [Root(host, "/" + d) for d in sorted(names) if SUBVOLUME.fullmatch(d)]
            if any(HEX2.fullmatch(d) for d in names):
                found.append(Root(host, ""))
        return found

    def _folder(self, root: Root) -> str:
        return self.dirs[root.host] + root.prefix

    def files(self, path: str, below: str, out: list[tuple[str, int, int]]) -> None:
        """(name below the `<aa>/<bb>` folder, size, mtime_ms) of every file under `path`
        (a base64 name holding `/` is a folder chain, over a thousand deep for some keys of the
        Go original: a stack, not recursion)."""
        folders = [(path, below)]
        while folders:
            path, below = folders.pop()
            try:
                for e in _entries(path):
                    if e.is_file(follow_symlinks=False):
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted since the folder was read, as in _folder_files
                        out.append((below + e.name, st.st_size, st.st_mtime_ns // 1_000_000))
                    elif e.is_dir(follow_symlinks=False):
                        folders.append((e.path, below + e.name + "/"))
            except OSError as e:
                self.errors.append(f"cannot read {path}: {e.strerror}")

    def _folder_files(self, path: bytes, folder: bytes, volume: str,
                      group: dict[bytes, list[Found]], seen: dict[bytes, bytes | None]) -> int:
        """Add the files of one `<aa>/<bb>` folder of `volume` to `group` by key, as add_copies
        does, in one loop over scandir (the costly part of a local rebuild: a few calls per file);
        `folder` is the folder's two bytes (name2key). Names stay bytes: no decoding of each. A
        nested folder (a name holding `/`) goes through files(). The names skipped."""
        skipped = 0
        nested: list[tuple[str, int, int]] = []
        try:
            it = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return 0  # gone since its parent was listed
        except OSError as e:
            self.errors.append(f"cannot read {os.fsdecode(path)}: {e.strerror}")
            return 0
        try:
            with it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        name = e.name
                        key = seen.get(name, b"")
                        if key == b"":
                            key = seen[name] = name2key(folder, name)
                        if key is None:
                            skipped += 1
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted since the folder was read: a live server's DELETE
                        # tuple.__new__: a NamedTuple's own __new__ is a Python call, twice the cost
                        found = _new(Found, (volume, st.st_size, st.st_mtime_ns // 1_000_000))
                        copies = group.get(key)
                        if copies is None:
                            group[key] = [found]
                        else:
                            copies.append(found)
                    elif e.is_dir(follow_symlinks=False):
                        self.files(os.fsdecode(e.path), os.fsdecode(e.name) + "/", nested)
        except OSError as e:
            self.errors.append(f"cannot read {os.fsdecode(path)}: {e.strerror}")
        if nested:
            skipped += add_copies(group, {}, volume, nested, f"/{folder.hex()[:2]}/{folder.hex()[2:]}/")
        return skipped

    async def walk(self, roots: list[Root], handle: Callable[[dict[bytes, list[Found]]], Awaitable[None]],
                   done: Callable[[], None], stop: asyncio.Event | None = None, aas: range | list = range(256)) -> int:
        """As Walker.walk, over the folders `<aa>` of `aas`. Returns the files skipped."""
        skipped = 0
        folders = 0
        # paths as bytes, names looked up in _HEX: a `<bb>` folder of each root costs no decoding,
        # no regular expression and no path built from text (two folders a key at 1M keys)
        bases = [(os.fsencode(self._folder(root)), root.volume) for root in roots]
        for a in aas:
            if stop is not None and stop.is_set():
                break
            aa = b"/%02x" % a
            bbs: dict[bytes, list[tuple[bytes, str]]] = {}
            for base, volume in bases:
                try:
                    entries = _entries(base + aa)
                except OSError as e:  # unreadable, a link loop: that folder is missing, not the rest
                    self.errors.append(f"cannot read {os.fsdecode(base + aa)}: {e.strerror}")
                    continue
                for e in entries:
                    # a folder as before (a C call), a link to one through _is_dir
                    if e.name in _HEX and (e.is_dir(follow_symlinks=False) or _is_dir(e)):
                        bbs.setdefault(e.name, []).append((base, volume))
            for bb in sorted(bbs):
                group: dict[bytes, list[Found]] = {}
                seen: dict[bytes, bytes | None] = {}  # a name is decoded once for all its copies
                folder = bytes((a,)) + _HEX[bb]
                tail = aa + b"/" + bb
                for base, volume in bbs[bb]:
                    skipped += self._folder_files(base + tail, folder, volume, group, seen)
                if group:
                    await handle(group)
                folders += 1
                if folders % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let Ctrl-C and the progress bar through
            done()
        return skipped
