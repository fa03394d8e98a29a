"""AWS Signature Version 4, as S3 checks it: header-signed requests, presigned URLs and the
per-chunk signatures of `aws-chunked` bodies.

Only used when credentials are configured (`-s3-access-key` / `-s3-secret-key`); otherwise the
front accepts any signature, or none. The canonical request is rebuilt from the request as it
arrived: S3 does not normalise paths, so the path is the one on the wire (and, should a client
have escaped it differently, the decoded key escaped the canonical way); query parameters are
decoded and re-escaped with AWS's rule (only A-Z a-z 0-9 - _ . ~ left as they are), then sorted.
Everything is handled as latin-1 text so the bytes hashed are exactly the bytes received.
The payload hash is the client's `x-amz-content-sha256` (or UNSIGNED-PAYLOAD for presigned
URLs); that the body really has that hash is checked while it streams (payload.py).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from minikv.s3.errors import S3Error
from minikv.s3.numbers import decimal

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW = 15 * 60  # seconds, as S3
MAX_PRESIGN = 7 * 24 * 3600


def uri_encode(data: bytes, safe: str = "-_.~") -> str:
    return quote(data, safe=safe)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


@dataclass
class Signed:
    """A verified request's signing context: what a streaming body's chunk signatures chain from."""

    key: bytes
    amz_date: str
    scope: str
    signature: str

    def chunk_signature(self, previous: str, chunk_sha256: str) -> str:
        return hmac_hex(self.key, "\n".join((
            "AWS4-HMAC-SHA256-PAYLOAD", self.amz_date, self.scope, previous, EMPTY_SHA256, chunk_sha256)))

    def trailer_signature(self, previous: str, trailer: bytes) -> str:
        return hmac_hex(self.key, "\n".join((
            "AWS4-HMAC-SHA256-TRAILER", self.amz_date, self.scope, previous,
            hashlib.sha256(trailer).hexdigest())))


def parse_query(query: bytes) -> list[tuple[bytes, bytes]]:
    """Raw query parameters, percent-decoded ('+' stays '+', as AWS signs it)."""
    out = []
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        out.append((unquote_to_bytes(name) if b"%" in name else name,
                    unquote_to_bytes(value) if b"%" in value else value))
    return out


def canonical_query(params: list[tuple[bytes, bytes]], drop: str = "") -> str:
    pairs = sorted((uri_encode(n), uri_encode(v)) for n, v in params if n.decode("latin-1") != drop)
    return "&".join(f"{n}={v}" for n, v in pairs)


def _parse_credential(text: str) -> tuple[str, str, str, str]:
    parts = text.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise S3Error("AuthorizationHeaderMalformed",
                      f"the Credential is malformed; expecting \"<key>/<YYYYMMDD>/<region>/s3/aws4_request\", got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def _parse_header(value: str) -> tuple[str, str, list[str], str]:
    """(credential, signed headers, signature) of an `Authorization: AWS4-HMAC-SHA256 ...`."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3Error("AuthorizationHeaderMalformed", f"unsupported signature algorithm {algorithm!r}")
    fields = {}
    for item in rest.split(","):
        name, eq, val = item.strip().partition("=")
        if eq:
            fields[name] = val
    try:
        return fields["Credential"], fields["SignedHeaders"], fields["SignedHeaders"].split(";"), fields["Signature"]
    except KeyError as e:
        raise S3Error("AuthorizationHeaderMalformed", f"the authorization header lacks {e.args[0]}") from None


def _amz_time(amz_date: str) -> float:
    try:
        return calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        raise S3Error("AccessDenied", f"invalid x-amz-date {amz_date!r}") from None


def unsigned_amz_headers(headers: list[tuple[bytes, bytes]], signed_names: list[str]) -> list[str]:
    """The x-amz-* headers of a request that its signature does not cover. x-amz-content-sha256
    is covered either way: its value is the payload line of the canonical request."""
    signed = set(signed_names)
    out = []
    for name, _ in headers:
        if name.startswith(b"x-amz-") and name != b"x-amz-content-sha256":
            text = name.decode("latin-1")
            if text not in signed and text not in out:
                out.append(text)
    return out


def verify(method: bytes, path: bytes, key: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
           access_key: str, secret_key: str, now: float | None = None) -> Signed:
    """Check a request's SigV4 signature (header or presigned); the signing context, or S3Error."""
    now = time.time() if now is None else now
    params = parse_query(query)
    names = {n for n, _ in params}
    auth = next((v for n, v in headers if n == b"authorization"), None)
    presigned = auth is None and b"X-Amz-Signature" in names
    if auth is None and not presigned:
        raise S3Error("AccessDenied", "this server requires signed requests (AWS Signature Version 4)")
    if presigned:
        q = {n.decode("latin-1"): v.decode("latin-1") for n, v in params}
        if q.get("X-Amz-Algorithm") != ALGORITHM:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        try:
            credential, signed_list, signature = q["X-Amz-Credential"], q["X-Amz-SignedHeaders"], q["X-Amz-Signature"]
            amz_date = q["X-Amz-Date"]
        except KeyError as e:
            raise S3Error("AuthorizationQueryParametersError", f"presigned URL lacks {e}") from None
        expires = decimal(q.get("X-Amz-Expires", "0"))
        if expires is None:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be a plain decimal number")
        signed_names = signed_list.split(";")
        payload = UNSIGNED_PAYLOAD
        for n, v in headers:
            if n == b"x-amz-content-sha256":
                payload = v.decode("latin-1")
        t = _amz_time(amz_date)
        if not 0 <= expires <= MAX_PRESIGN:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be between 0 and 604800")
        if now > t + expires:
            raise S3Error("AccessDenied", "Request has expired")
        if t - now > MAX_SKEW:
            raise S3Error("RequestTimeTooSkewed", "the presigned URL's date is in the future")
        query_variants = [canonical_query(params, drop="X-Amz-Signature")]
    else:
        value = auth.decode("latin-1")
        if value.startswith("AWS "):
            raise S3Error("AccessDenied", "AWS Signature Version 2 is not supported: use Signature Version 4")
        credential, _, signed_names, signature = _parse_header(value)
        hdr = {}
        for n, v in headers:
            if n in (b"x-amz-date", b"date", b"x-amz-content-sha256"):
                hdr[n] = v.decode("latin-1")
        amz_date = hdr.get(b"x-amz-date", "")
        if not amz_date:
            raise S3Error("AccessDenied", "AWS authentication requires a valid x-amz-date header")
        payload = hdr.get(b"x-amz-content-sha256")
        if payload is None:
            raise S3Error("InvalidRequest", "missing required header for this request: x-amz-content-sha256")
        if abs(now - _amz_time(amz_date)) > MAX_SKEW:
            raise S3Error("RequestTimeTooSkewed",
                          "the difference between the request time and the server's time is too large")
        query_variants = [canonical_query(params)]
        raw = "&".join(sorted(p.decode("latin-1") for p in query.split(b"&") if p))
        if raw != query_variants[0]:
            query_variants.append(raw)  # a client that signed its query string as it sent it
    access, date, region, service = _parse_credential(credential)
    if access != access_key:
        raise S3Error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
    if not amz_date.startswith(date):
        raise S3Error("AuthorizationHeaderMalformed", "the credential date does not match x-amz-date")
    if "host" not in signed_names:
        raise S3Error("AccessDenied", "the Host header must be signed")
    unsigned = unsigned_amz_headers(headers, signed_names)
    if unsigned:
        # as S3: an x-amz-* header changes what the request does (x-amz-copy-source turns an
        # upload into a copy of any object), so one added to a signed request is refused
        raise S3Error("AccessDenied", "There were headers present in the request which were not signed: "
                      + ", ".join(unsigned), HeadersNotSigned=", ".join(unsigned))
    canonical_headers = []
    for name in signed_names:
        values = [v.decode("latin-1") for n, v in headers if n == name.encode("latin-1")]
        canonical_headers.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    scope = f"{date}/{region}/{service}/aws4_request"
    skey = signing_key(secret_key, date, region, service)
    raw_path = path.decode("latin-1")
    paths = [raw_path]
    canonical_path = uri_encode(key, safe="/-_.~")
    if canonical_path != raw_path:
        paths.append(canonical_path)
    for p in paths:
        for q in query_variants:
            creq = "\n".join((method.decode("latin-1"), p, q, "".join(canonical_headers),
                              ";".join(signed_names), payload))
            to_sign = "\n".join((ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode("latin-1")).hexdigest()))
            if hmac.compare_digest(hmac_hex(skey, to_sign), signature):
                return Signed(skey, amz_date, scope, signature)
    raise S3Error("SignatureDoesNotMatch",
                  "The request signature we calculated does not match the signature you provided. "
                  "Check your key and signing method.")
