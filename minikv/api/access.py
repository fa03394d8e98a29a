"""Who may use the index port: one access model for the plain API and S3.

No credentials configured: everything is open, as in minikeyvalue, and `access_for` answers
None so the server checks nothing at all (the hot path pays one `is None`).

With `-s3-access-key` / `-s3-secret-key` (or their environment variables) every request must
prove it knows them:
- S3 requests: a SigV4 signature (header or presigned URL), checked by the S3 front;
- plain-API requests: `Authorization: Basic base64(access:secret)`, what `curl -u access:secret`
  sends (and what `curl -L` does not resend to the volume it is redirected to). A SigV4-signed
  request is always S3's (s3/detect.py), so SigV4 cannot stand in for it.
A plain request without it gets 401 with `WWW-Authenticate: Basic realm="minikv"`.
`-open-api read` leaves GET and HEAD (reads, `?list`, `?unlinked`) open to anyone, `-open-api
all` the whole plain API, for clusters on a private network whose S3 clients must sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from minikv.http.response import HTTPError

OPEN_API = ("none", "read", "all")
CHALLENGE = [("WWW-Authenticate", 'Basic realm="minikv"')]
_READS = (b"GET", b"HEAD")


def basic_header(access_key: str, secret_key: str) -> str:
    """The `Authorization` value a client of the plain API sends (admin commands use it)."""
    return "Basic " + base64.b64encode(f"{access_key}:{secret_key}".encode()).decode("ascii")


class Access:
    """The check of plain-API requests on a port with credentials."""

    __slots__ = ("expected", "reads_open")

    def __init__(self, access_key: str, secret_key: str, open_api: str = "none"):
        # compared as digests: the time taken tells neither the pair's bytes nor its length
        self.expected = hashlib.sha256(f"{access_key}:{secret_key}".encode()).digest()
        self.reads_open = open_api == "read"

    def check(self, method: bytes, headers: list) -> None:
        """Return if the request may go on; raise the 401 that says why not."""
        if self.reads_open and method in _READS:
            return
        self._check(headers)  # a HEAD's 401 goes without its reason: the HTTP layer leaves it out

    def _check(self, headers: list) -> None:
        value = None
        for name, v in headers:
            if name == b"authorization":
                value = v
                break
        if value is None:
            what = "writes need" if self.reads_open else "this index needs"
            raise HTTPError(401, f"{what} credentials: send HTTP Basic with the S3 access key and "
                                 "secret key (curl -u KEY:SECRET)", CHALLENGE)
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            raise HTTPError(401, f"the plain API takes HTTP Basic credentials (curl -u KEY:SECRET), "
                                 f"not {scheme.decode('latin-1')[:20]!r}", CHALLENGE)
        try:
            pair = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(401, "malformed HTTP Basic credentials", CHALLENGE) from None
        if not hmac.compare_digest(hashlib.sha256(pair).digest(), self.expected):
            raise HTTPError(401, "wrong credentials: the S3 access key and secret key are expected", CHALLENGE)


def access_for(config) -> Access | None:
    """The check for this server, or None when nothing is to be checked (decided once, at start)."""
    if not config.s3_secret_key or config.open_api == "all":
        return None
    return Access(config.s3_access_key, config.s3_secret_key, config.open_api)


def client_headers(args) -> list[tuple[str, str]]:
    """The headers an admin command sends to a running index: its credentials when it has them
    (-s3-access-key, -s3-secret-key-file or MINIKV_S3_ACCESS_KEY / MINIKV_S3_SECRET_KEY)."""
    import os

    access = getattr(args, "s3_access_key", "") or os.environ.get("MINIKV_S3_ACCESS_KEY", "")
    secret = getattr(args, "s3_secret_key", "") or os.environ.get("MINIKV_S3_SECRET_KEY", "")
    return [("Authorization", basic_header(access, secret))] if access and secret else []


def start_notes(config) -> list[str]:
    """What the server says at start about the access it gives."""
    if not config.s3_secret_key:
        return []
    open_api = {"read": "open to anyone for reads (-open-api read)", "all": "open to anyone (-open-api all)"}
    notes = [f"S3 requests need SigV4 signatures; the plain API is "
             f"{open_api.get(config.open_api, 'closed to requests without HTTP Basic credentials')}"]
    if not config.secret:
        notes.append("warning: the volumes take writes from anyone who reaches them: give them and the "
                      "index -secret (MINIKV_SECRET), or keep their ports private")
    return notes
