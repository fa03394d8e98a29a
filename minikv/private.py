"""Keeping secrets out of sight: out of `ps`, out of logs, and the index out of other users' reach.

- A secret given as a flag is in the process's argv, which every user of the machine can read
  (`ps`, /proc/PID/cmdline): the commands warn and name the environment variable (or file) to
  use instead.
- Logged request targets lose the values of their signature parameters (SigV4 and SigV2
  presigned URLs, nginx secure_link's `md5=`): a logged signature is a working credential until
  it expires.
- The index (the LMDB files under -db, the S3 metadata, the lock) is readable by the server's
  user only: it names every key. Volumes' value files are nginx's business (its workers must
  read them) and are not changed here.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import unquote_to_bytes

# flag -> where the secret should come from instead
SECRET_FLAGS = {
    "secret": "MINIKV_SECRET",
    "s3-secret-key": "MINIKV_S3_SECRET_KEY or -s3-secret-key-file",
}
# query parameters whose value is a signature or a token (names compared lower-case)
_SECRET_PARAMS = frozenset((b"x-amz-signature", b"signature", b"md5", b"x-amz-security-token"))
REDACTED = b"REDACTED"


def argv_warnings(given) -> list[str]:
    """A line for every secret flag among `given` (the flags named on the command line)."""
    return [f"warning: -{flag} on the command line is visible to every user of this machine (ps); "
            f"use {instead} instead" for flag, instead in SECRET_FLAGS.items() if flag in given]


def read_secret_file(path: str) -> str:
    """The secret kept in a file (its first line, without the newline)."""
    with open(path, encoding="utf-8") as f:
        secret = f.readline().strip()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def redact_target(url: bytes) -> str:
    """A request target fit for a log line: signature values replaced by REDACTED."""
    path, q, query = url.partition(b"?")
    if q:
        parts = query.split(b"&")
        for i, part in enumerate(parts):
            name, eq, _ = part.partition(b"=")
            if eq and unquote_to_bytes(name).lower() in _SECRET_PARAMS:
                parts[i] = name + b"=" + REDACTED
        url = path + b"?" + b"&".join(parts)
    return url.decode("latin-1")


INDEX_FILES = ("data.mdb", "lock.mdb", "minikv-server.lock", "s3/data.mdb", "s3/lock.mdb")


def keep_index_private(db: str) -> None:
    """From now on this process creates files for its user only (the index server and the admin
    commands create no file anyone else needs), and the index files that exist become so."""
    os.umask(0o077)
    if not db or "://" in db:  # no local index (rebalance -server, a database server)
        return
    for name in (*INDEX_FILES, "s3"):
        path = os.path.join(db, name)
        try:
            st = os.stat(path, follow_symlinks=False)
            if st.st_uid == os.geteuid() and not stat.S_ISLNK(st.st_mode):
                want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
                if stat.S_IMODE(st.st_mode) & ~want:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & want)
        except OSError:
            continue  # not there (yet): made private by the umask when it is created
