"""Where a key lives: its path on a volume and the volumes that hold it.

This is minikeyvalue's on-disk contract, byte for byte, so that a cluster written by the Go
original can be read (and rebuilt) by minikv and back. No I/O here; the fixed-output tests in
tests/test_placement.py pin it: if they change, existing clusters become unreadable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from operator import itemgetter

try:  # CPython's own md5 is twice as fast as OpenSSL's on the short inputs hashed here
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - other Pythons
    _md5 = hashlib.md5

_score_of = itemgetter(0)

# A name on a volume is one path component; ext4, xfs and most others cap it at 255 bytes.
MAX_NAME_BYTES = 255


def key2path(key: bytes) -> str:
    """`/<md5[0]>/<md5[1]>/<base64(key)>`, the file's path below a (sub)volume."""
    return key2path_bytes(key).decode()


def key2path_bytes(key: bytes) -> bytes:
    """key2path as bytes, for the read path, which writes it straight into a response."""
    digest = _md5(key).digest()
    return b"/%02x/%02x/%s" % (digest[0], digest[1], base64.b64encode(key))


def path2key(path: str) -> bytes | None:
    """The key stored at `/<aa>/<bb>/<base64>` (subvolume folder removed), or None if the
    path is not one minikeyvalue could have written."""
    parts = path.lstrip("/").split("/", 2)
    if len(parts) != 3:
        return None
    try:
        key = base64.b64decode(parts[2], validate=True)
    except ValueError:
        return None
    return key if key and key2path(key) == "/" + path.lstrip("/") else None


def name2key(folder: bytes, name: bytes) -> bytes | None:
    """path2key for a file `name` (no `/`) in the `<aa>/<bb>` folder whose two bytes are
    `folder` (bytes.fromhex("aabb")): the same answer at a third of its cost, for the walks of
    local folders, which ask it once per key."""
    try:
        key = binascii.a2b_base64(name)  # lenient: the exact re-encoding below is the check
    except binascii.Error:
        return None
    if key and _md5(key).digest()[:2] == folder and binascii.b2a_base64(key, newline=False) == name:
        return key
    return None


def keys_above(key: bytes) -> list[bytes]:
    """The keys whose file, on a volume holding both, is one of the folders this key's file is
    in: a base64 name with "/" makes folders, and a key whose name is such a folder's name (same
    md5 folder) would have to be a file there. Only keys with a byte 0xFC-0xFF can be above
    another: a 4-character group that starts with "/" encodes one."""
    name = base64.b64encode(key)
    out = []
    i = name.find(b"/", 4)
    while i > 0:  # most names have no "/" at all: no md5 then
        if i % 4 == 0:
            other = base64.b64decode(name[:i])
            if key2path_bytes(other)[:7] == key2path_bytes(key)[:7]:  # the same /aa/bb/
                out.append(other)
        i = name.find(b"/", i + 1)
    return out


def key2volume(key: bytes, volumes: list[str], replicas: int, subvolumes: int) -> list[str]:
    """The `replicas` volumes a key belongs on, best first.

    Volumes are ranked by md5(key + name), compared as raw bytes, highest first; the sort is
    stable so equal scores keep the order of `volumes`. With subvolumes, the chosen volume
    becomes `volume/svXX` from the last four bytes of its score.
    """
    # sorted(reverse=True) keeps equal items in their original order, as Go's SliceStable does.
    ranked = sorted([(_md5(key + v.encode()).digest(), v) for v in volumes], key=_score_of, reverse=True)
    chosen = []
    for s, volume in ranked[:replicas]:
        if subvolumes > 1:
            volume = f"{volume}/sv{int.from_bytes(s[12:16], 'big') % subvolumes:02X}"
        chosen.append(volume)
    return chosen


def epoch(volumes: list[str], replicas: int, subvolumes: int) -> int:
    """A 32-bit name for a cluster layout (never 0): records remember the one they were placed
    under, so a read knows a key is where placement wants it without recomputing placement."""
    return zlib.crc32(f"{','.join(volumes)};{replicas};{subvolumes}".encode()) or 1


def needs_rebalance(volumes: list[str] | tuple[str, ...], kvolumes: list[str]) -> bool:
    """True when a key's replicas are not exactly where placement wants them (order counts,
    as in the Go original: the first replica is the one placement ranks best)."""
    return list(volumes) != list(kvolumes)


def host_of(volume: str) -> str:
    """`localhost:3001` for `localhost:3001/sv03`: the server a (sub)volume lives on."""
    return volume.split("/", 1)[0]


def name_too_long(key: bytes) -> int:
    """0 if every component of the key's file name fits a filename, else the longest length."""
    if len(key) <= 189:  # base64 of 189 bytes is 252 characters: always fits
        return 0
    longest = max(len(part) for part in base64.b64encode(key).split(b"/"))
    return longest if longest > MAX_NAME_BYTES else 0
