"""Reading which files the volumes hold straight from their folders on this machine.

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
import resource
from collections.abc import Awaitable, Callable, Iterable

from minikv.admin.walk import HEX2, SUBVOLUME, Found, Root, add_copies
from minikv.placement import name2key

_new = tuple.__new__
_HEX = {b"%02x" % i: bytes((i,)) for i in range(256)}  # an `<aa>` or `<bb>` folder's name: its byte
_AT_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # an `<aa>` folder, opened to look up its files from
OPEN_FOLDERS = 256  # `<aa>` folders a walk keeps open at most (one per root): the others' files by path
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
        # a quarter of the descriptors this process may have, at most: the rest stay for what
        # the walk's handler opens (an index, a value read for its md5, connections); after the
        # first that cannot be opened, none is (every file by path then, as when they are not)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.open_most = OPEN_FOLDERS if soft == resource.RLIM_INFINITY else min(OPEN_FOLDERS, soft // 4)

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

    def _bb_files(self, tail: bytes, folder: bytes, where: list[tuple[bytes, str, int | None]]) -> tuple[dict[bytes, list[Found]], int]:
        """The files of one `<aa>/<bb>` folder (`tail`, its two bytes `folder`) on every root of
        `where` ([(root folder, volume, its open `<aa>` folder)]), by key, as add_copies makes
        them, and how many names are no key. The costly part of a local rebuild, so one listdir
        per folder and one lstat per name, that from the `<aa>` folder (two names for the kernel
        to look up, not the whole path's seven: 3% of a rebuild): copies are grouped by file name
        (bytes: nothing decoded per file) and each name is decoded once at the end, for all its
        copies. A nested folder (a name holding `/`) goes through files()."""
        by_name: dict[bytes, list[Found]] = {}
        nested: list[tuple[str, list]] = []
        below = tail[4:] + b"/"  # `<bb>/`, from the `<aa>` folder
        for base, volume, aa_fd in where:
            path = base + tail
            # from the open `<aa>` folder, or (None: not open) from the whole path
            prefix = below if aa_fd is not None else path + b"/"
            try:
                names = os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone since its parent was listed
            except OSError as e:
                self.errors.append(f"cannot read {os.fsdecode(path)}: {e.strerror}")
                continue
            # names, then a stat of each (needed for its size anyway, and it tells a file from a
            # folder): no entry object per file, which cost more than the stat's own Python
            path += b"/"
            for name in names:
                try:
                    st = os.lstat(prefix + name, dir_fd=aa_fd)
                except FileNotFoundError:
                    continue  # deleted since the folder was read: a live server's DELETE
                except NotADirectoryError:
                    break  # the folder is gone since it was read, as above
                except OSError as e:  # one error for the folder, as its listing's (not one per name)
                    self.errors.append(f"cannot read {os.fsdecode(path[:-1])}: {e.strerror}")
                    break
                kind = st.st_mode & 0o170000
                if kind == 0o100000:  # a regular file
                    # tuple.__new__: a NamedTuple's own __new__ is a Python call, twice the cost
                    found = _new(Found, (volume, st.st_size, st.st_mtime_ns // 1_000_000))
                    copies = by_name.get(name)
                    if copies is None:
                        by_name[name] = [found]
                    else:
                        copies.append(found)
                elif kind == 0o040000:  # a folder: a base64 name holding `/`
                    files: list[tuple[str, int, int]] = []
                    self.files(os.fsdecode(path + name), os.fsdecode(name) + "/", files)
                    nested.append((volume, files))
        group: dict[bytes, list[Found]] = {}
        skipped = 0
        for name, copies in by_name.items():
            key = name2key(folder, name)
            if key is None:
                skipped += len(copies)
            else:
                group[key] = copies
        for volume, files in nested:
            skipped += add_copies(group, {}, volume, files, f"/{folder.hex()[:2]}/{folder.hex()[2:]}/")
        return group, skipped

    def _still(self, fds: list[tuple[bytes, int]]) -> None:
        """An error for each `<aa>` folder (path, open descriptor) whose path now leads elsewhere
        (a link re-pointed, a mount): its `<bb>` folders were listed by path and their files
        looked up in the one opened, so some of its files may have been missed."""
        for path, fd in fds:
            try:
                now = os.stat(path)
            except OSError:
                now = None
            then = os.fstat(fd)
            if now is None or (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
                self.errors.append(f"{os.fsdecode(path)} was replaced while it was walked (a link re-pointed, "
                                   "a mount?): some of its files may be missed; walk it again")

    async def walk(self, roots: list[Root], handle: Callable[[dict[bytes, list[Found]]], Awaitable[None]],
                   done: Callable[[], None], stop: asyncio.Event | None = None, aas: Iterable[int] = range(256)) -> int:
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
            bbs: dict[bytes, list[tuple[bytes, str, int | None]]] = {}
            fds: list[tuple[bytes, int]] = []  # the `<aa>` folders open, closed when done with them
            try:
                for base, volume in bases:
                    try:
                        # names only (no entry object, no type): a name of two hex digits is taken
                        # for a `<bb>` folder, and a file so named fails its listdir, skipped there
                        names = os.listdir(base + aa)
                        opened = None  # not open: too many are, or one could not be
                        if len(fds) < self.open_most:
                            try:
                                opened = os.open(base + aa, _AT_FOLDER)
                                fds.append((base + aa, opened))
                            except OSError:  # EMFILE: no descriptor to spare
                                self.open_most = 0
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except OSError as e:  # unreadable, a link loop: that folder is missing, not the rest
                        self.errors.append(f"cannot read {os.fsdecode(base + aa)}: {e.strerror}")
                        continue
                    root = (base, volume, opened)
                    for name in names:
                        if name in _HEX:
                            where = bbs.get(name)
                            if where is None:
                                bbs[name] = [root]
                            else:
                                where.append(root)
                for bb in sorted(bbs):
                    group, n = self._bb_files(aa + b"/" + bb, bytes((a,)) + _HEX[bb], bbs[bb])
                    skipped += n
                    if group:
                        await handle(group)
                    folders += 1
                    if folders % YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # let Ctrl-C and the progress bar through
                self._still(fds)
            finally:
                for _, fd in fds:
                    os.close(fd)
            done()
        return skipped
