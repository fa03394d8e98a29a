"""Index records: what the index knows about one key, and the legal moves between states.

A record is one LMDB value. Its first byte is the state:

    LIVE      b"L" + <QQ16sI size, mtime_ms, md5, epoch> + volumes (utf-8, comma separated)
    UNLINKED  b"U" + same fields as LIVE (soft deleted: unreadable, listed by ?unlinked)
    PENDING   b"P" + <cIQ op, owner pid, started_ms> + volumes [+ b";" size b":" md5 hex b":" mtime]
              + b"\\n" + previous record   (an S3 write's value, known at its commit, for recovery)

PENDING is the per-key lock (HTTP 409): a write, delete or rebalance is in flight. It names the
volumes being touched and keeps the record it replaced, so that whoever finds it after a crash
knows what to undo (see index/recovery.py). An md5 of 16 zero bytes means "not computed"
(`-md5sum=false`). Volume names never contain ",", ";" or "\\n" (nor NUL: they come from argv).

A composite value (an S3 object made by CompleteMultipartUpload, see s3/composite.py) is a
LIVE/UNLINKED record whose volume list is replaced by NUL + <upload id> + "/" + its part numbers
(comma separated): its bytes are the parts of that upload, in that order, each an ordinary value
of its own; size is the total, md5 is not computed. No file lies under the key itself. `epoch` is placement.epoch() of
the cluster layout under which `volumes` were exactly the key's placement (0: not known), so a
read can tell `Key-Balance` without hashing the key against every volume.

    absent ──PUT──▶ PENDING(put) ──ok──▶ LIVE ──UNLINK──▶ UNLINKED ──DELETE──▶ PENDING(delete) ─▶ absent
                         │                 │  ──DELETE──▶ PENDING(delete) ─▶ absent
                         └──fail──▶ absent └─REBALANCE──▶ PENDING(rebalance) ─▶ LIVE
    (a DELETE that could not remove every replica leaves the key UNLINKED, to be deleted again)
"""

from __future__ import annotations

import struct
import time
from typing import NamedTuple

LIVE = ord("L")
UNLINKED = ord("U")
PENDING = ord("P")

OP_PUT = b"p"
OP_DELETE = b"d"
OP_REBALANCE = b"r"

_DATA = struct.Struct("<QQ16sI")
VOLUMES_AT = 1 + _DATA.size  # where the volume list starts in a LIVE/UNLINKED record
EPOCH_AT = VOLUMES_AT - 4
MD5_AT = 17
_PENDING = struct.Struct("<cIQ")
NO_MD5 = bytes(16)


def now_ms() -> int:
    """The clock of records (mtime_ms, started_ms): milliseconds since the epoch."""
    return int(time.time() * 1000)


class IllegalTransition(Exception):
    """A state change the table below does not allow: a bug, never a client's fault."""


# state before -> states a compare-and-set may move it to (None: absent)
TRANSITIONS: dict[int | None, set[int | None]] = {
    None: {PENDING},
    PENDING: {LIVE, UNLINKED, None},
    LIVE: {UNLINKED, PENDING},
    UNLINKED: {PENDING, UNLINKED},
}


def check_transition(before: bytes | None, after: bytes | None) -> None:
    b = before[0] if before else None
    a = after[0] if after else None
    if a == b == PENDING and is_claim(before, after):
        return
    if a not in TRANSITIONS.get(b, ()):
        raise IllegalTransition(f"record cannot go from {_name(b)} to {_name(a)}")


def _name(state: int | None) -> str:
    return {LIVE: "LIVE", UNLINKED: "UNLINKED", PENDING: "PENDING", None: "absent"}.get(state, "?")


class Data(NamedTuple):
    """A LIVE or UNLINKED record."""

    state: int
    volumes: list[str]
    size: int
    mtime_ms: int
    md5: bytes
    epoch: int = 0

    @property
    def md5_hex(self) -> str:
        return "" if self.md5 == NO_MD5 else self.md5.hex()


class Pending(NamedTuple):
    op: bytes
    owner: int
    started_ms: int
    volumes: list[str]
    previous: bytes  # the encoded record this one replaced, b"" if none
    new: tuple[int, bytes, int] | None = None  # (size, md5, mtime_ms) of an S3 write's value, for recovery


def encode_data(state: int, volumes: list[str], size: int, mtime_ms: int, md5: bytes, epoch: int = 0) -> bytes:
    return bytes((state,)) + _DATA.pack(size, mtime_ms, md5 or NO_MD5, epoch) + ",".join(volumes).encode()


def decode_data(raw: bytes) -> Data:
    size, mtime_ms, md5, epoch = _DATA.unpack_from(raw, 1)
    return Data(raw[0], raw[VOLUMES_AT:].decode().split(","), size, mtime_ms, md5, epoch)


def encode_pending(op: bytes, owner: int, started_ms: int, volumes: list[str], previous: bytes = b"",
                   new: tuple[int, bytes, int] | None = None) -> bytes:
    line = ",".join(volumes).encode()
    if new is not None:  # after the volumes: `;<size>:<md5 hex>:<mtime_ms>`
        line += b";%d:%s:%d" % (new[0], new[1].hex().encode(), new[2])
    return b"P" + _PENDING.pack(op, owner, started_ms) + line + b"\n" + previous


def decode_pending(raw: bytes) -> Pending:
    op, owner, started_ms = _PENDING.unpack_from(raw, 1)
    line, _, previous = raw[1 + _PENDING.size:].partition(b"\n")
    volumes, _, mark = line.partition(b";")
    new = None
    try:
        size, md5, mtime = mark.split(b":")
        new = (int(size), bytes.fromhex(md5.decode()), int(mtime))
    except ValueError:  # none (an older minikv's lock, a plain PUT's) or damaged: not known
        pass
    return Pending(op, owner, started_ms, volumes.decode().split(",") if volumes else [], previous, new)


def reowned(raw: bytes, owner: int, started_ms: int) -> bytes:
    """The same PENDING record, held by process `owner` since `started_ms` (recovery claims a
    dead process's lock so before it resolves it)."""
    op = raw[1:2]
    return b"P" + _PENDING.pack(op, owner, started_ms) + raw[1 + _PENDING.size:]


def is_claim(before: bytes, after: bytes) -> bool:
    """Is PENDING `after` the PENDING `before` under another owner (reowned)?"""
    return before[1:2] == after[1:2] and before[1 + _PENDING.size:] == after[1 + _PENDING.size:]


def with_state(raw: bytes, state: int) -> bytes:
    """The same LIVE/UNLINKED record in another of those two states."""
    return bytes((state,)) + raw[1:]


COMPOSITE_MARK = 0  # first byte of the volume list of a composite record


def encode_composite(state: int, size: int, mtime_ms: int, upload_id: str, numbers: list[int]) -> bytes:
    tail = b"\0" + upload_id.encode() + b"/" + b",".join(b"%d" % n for n in numbers)
    return bytes((state,)) + _DATA.pack(size, mtime_ms, NO_MD5, 0) + tail


def is_composite(raw: bytes | None) -> bool:
    """Is `raw` a LIVE or UNLINKED record of a composite value?"""
    return raw is not None and len(raw) > VOLUMES_AT and raw[VOLUMES_AT] == COMPOSITE_MARK and raw[0] != PENDING


def decode_composite(raw: bytes) -> tuple[str, list[int]]:
    """(upload id, part numbers in order) of a composite record."""
    upload_id, _, numbers = raw[VOLUMES_AT + 1:].partition(b"/")
    return upload_id.decode(), [int(n) for n in numbers.split(b",")]


def readable(raw: bytes) -> bytes | None:
    """What readers see of a record that is not LIVE: the LIVE record a PENDING one keeps while
    the key is being moved (rebalance, repair) or overwritten (S3 PutObject), whose copies stay
    in place until the lock is released; None for anything else."""
    if raw[0] == PENDING and raw[1:2] in (OP_REBALANCE, OP_PUT):
        previous = decode_pending(raw).previous
        if previous[:1] == b"L":
            return previous
    return None
