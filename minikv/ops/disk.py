"""A volume's disk, as the volume server reports it: `minikv volume` refreshes a small JSON file
at the root of its folder, and nginx serves it like any file (stock nginx keeps serving the data;
no other port). The index reads it with the volume's other traffic.

The file has a fixed size and is overwritten in place: a full disk, the case that matters most,
has no room for a new file, but overwriting the blocks the file already holds needs none.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

DISK_FILE = ".minikv-disk.json"  # at the volume's root, where no key's file can be
FILE_SIZE = 512
REFRESH_EVERY = 2.0


def figures(directory: str) -> dict:
    """The disk holding `directory`: bytes in all, used, free to an unprivileged writer (what a
    nginx worker may still write), and its inodes (files) in all and free. A count of the
    volume's own files would need a walk of millions of them: the inodes are the cheap figure."""
    st = os.statvfs(directory)
    return {
        "time": round(time.time(), 3),
        "size": st.f_blocks * st.f_frsize,
        "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
        "inodes": st.f_files,
        "inodes_free": st.f_favail,
    }


def ext4_without_journal(directory: str, sys_root: str = "/sys") -> str | None:
    """The name of the device (`vda`) when `directory` is on an ext4 mounted without a journal,
    else None (another file system, a journal, or a kernel that does not say). Such an ext4
    will not reuse an inode deleted in the last minute and checks each one on every create
    near it: after many DELETEs, nginx's PUTs there cost it up to three times the CPU
    (README: the volumes' file system)."""
    try:
        st = os.stat(directory)
        link = os.readlink(f"{sys_root}/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        device = os.path.basename(link)
        with open(f"{sys_root}/fs/ext4/{device}/journal_task") as f:
            return device if f.read().strip() == "<none>" else None
    except OSError:
        return None


def write_figures(fd: int, directory: str) -> None:
    data = json.dumps(figures(directory)).encode().ljust(FILE_SIZE)[:FILE_SIZE]
    os.pwrite(fd, data, 0)


def start_reporter(directory: str, every: float = REFRESH_EVERY) -> threading.Thread | None:
    """Refresh DIR/.minikv-disk.json every `every` seconds, in a daemon thread (it ends with the
    volume server). Call once nginx runs: forking nginx while a thread runs is best avoided."""
    try:
        fd = os.open(os.path.join(directory, DISK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        os.fchmod(fd, 0o644)  # nginx's workers (another user when we run as root) must read it
        write_figures(fd, directory)
    except OSError as e:
        print(f"minikv volume: cannot write {DISK_FILE} in {directory} ({e.strerror}): the index will not "
              "show this volume's disk space", file=sys.stderr)
        return None

    def run() -> None:
        while True:
            time.sleep(every)
            try:
                write_figures(fd, directory)
            except OSError:
                pass  # the old figures stay; the index shows their age

    thread = threading.Thread(target=run, name="minikv-disk", daemon=True)
    thread.start()
    return thread
