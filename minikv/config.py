"""What an index server (and the admin commands) are told by their flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from minikv.http.server import Limits


def workers_for(db: str) -> int:
    """The default -workers: one per core, fewer when a PostgreSQL index shares the host."""
    from minikv.index.pg import default_workers, is_url, on_this_host

    cores = os.cpu_count() or 1
    return default_workers(cores) if is_url(db) and on_this_host(db) else cores


@dataclass
class Config:
    volumes: list[str]
    db: str
    port: int = 3000
    host: str = ""
    replicas: int = 3
    subvolumes: int = 10
    protect: bool = False
    fallback: str = ""
    md5sum: bool = True
    voltimeout: float = 1.0
    verbose: bool = False
    workers: int = 0
    verify_get: bool = False
    fsync: bool = False
    secret: str = ""
    signed: float = 0.0  # seconds a signed redirect stays valid; 0: unsigned
    max_value_size: int = 0
    max_connections: int = 10000
    worker_timeout: float = 15.0  # a worker whose loop is silent this long is replaced; 0: never
    limits: Limits = field(default_factory=Limits)
    s3_access_key: str = ""  # with s3_secret_key: S3 requests must be SigV4-signed with these
    s3_secret_key: str = ""
    # with the S3 credentials, what the plain API serves without them: "" / none, read, all
    open_api: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> Config:
        return cls(
            volumes=args.volume_list, db=args.db, port=args.port, host=args.host,
            replicas=args.replicas, subvolumes=args.subvolumes, protect=args.protect,
            fallback=args.fallback, md5sum=args.md5sum, voltimeout=args.voltimeout,
            verbose=args.v, workers=args.workers or workers_for(args.db),
            verify_get=args.verify_get, fsync=args.fsync, secret=args.secret, signed=args.signed,
            max_value_size=args.max_value_size, max_connections=args.max_connections,
            worker_timeout=args.worker_timeout,
            limits=Limits(max_url=args.max_url, max_header_bytes=args.max_header_bytes,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          idle_timeout=args.idle_timeout, body_min_rate=args.body_min_rate),
            s3_access_key=args.s3_access_key or os.environ.get("MINIKV_S3_ACCESS_KEY", ""),
            s3_secret_key=args.s3_secret_key or os.environ.get("MINIKV_S3_SECRET_KEY", ""),
            open_api=args.open_api,
        )

    def check(self) -> None:
        if not self.volumes:
            raise ValueError("no volumes: give -volumes host:port,host:port,...")
        if self.replicas < 1:
            raise ValueError("-replicas must be at least 1")
        if self.replicas > len(self.volumes):
            raise ValueError(f"-replicas {self.replicas} needs at least {self.replicas} volumes, "
                             f"-volumes names {len(self.volumes)}")
        if self.subvolumes < 1:
            raise ValueError("-subvolumes must be at least 1")
        if not self.voltimeout > 0:  # 0 would time out every volume request: all "unreachable"
            raise ValueError(f"-voltimeout {self.voltimeout:g}s: give how long a volume may take to answer, "
                             "more than 0 (default 1s)")
        if self.signed and not self.secret:
            raise ValueError("-signed needs -secret (or MINIKV_SECRET): the signature is made with it")
        if bool(self.s3_access_key) != bool(self.s3_secret_key):
            raise ValueError("S3 credentials need both -s3-access-key and -s3-secret-key "
                             "(or MINIKV_S3_ACCESS_KEY and MINIKV_S3_SECRET_KEY)")
        if self.open_api not in ("", "none", "read", "all"):
            raise ValueError(f"-open-api {self.open_api!r}: give none, read or all")
        if self.open_api in ("none", "read") and not self.s3_secret_key:
            raise ValueError(f"-open-api {self.open_api} closes the plain API to clients without credentials, "
                             "and none are set: give -s3-access-key and MINIKV_S3_SECRET_KEY")
        for i, v in enumerate(self.volumes):
            if "," in v or "/" in v or ";" in v or not v.rpartition(":")[2].isdigit():
                raise ValueError(f"volume {v!r} is not host:port")
            if v in self.volumes[:i]:
                # placement would put two replicas of a key in one file: fewer copies than asked
                raise ValueError(f"-volumes names {v} twice")

    @property
    def hosts(self) -> list[str]:
        return list(self.volumes)

    def pool(self):
        """A connection pool to the volumes that sends what this cluster needs (its secret)."""
        from minikv.http.client import Pool

        return Pool(self.voltimeout, secret=self.secret)
