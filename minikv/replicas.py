"""Operations on the files that hold a key's value: where they are, delete them, copy one.

Used by the API (PUT clean-up, DELETE, REBALANCE), by crash recovery and by the admin
commands, so that every place talks to volumes the same way. Values are always streamed:
a copy never holds more than a few chunks in memory.
"""

from __future__ import annotations

import asyncio

from minikv.http.client import Pool, VolumeError
from minikv.placement import key2path


def locate(volume: str, key: bytes) -> tuple[str, str]:
    """(server, path) of a key's file on `volume` (`host:port` or `host:port/svXX`)."""
    return locate_all([volume], key)[0]


def locate_all(volumes: list[str], key: bytes) -> list[tuple[str, str]]:
    """locate() for each volume, with the key's path worked out once."""
    path = key2path(key)
    out = []
    for volume in volumes:
        host, slash, sub = volume.partition("/")
        out.append((host, slash + sub + path if slash else path))
    return out


def url(volume: str, key: bytes) -> str:
    return "http://" + volume + key2path(key)


async def delete_all(pool: Pool, volumes: list[str], key: bytes) -> list[str]:
    """Delete the key's file on every volume at once; the reasons of those that failed (a file
    already gone counts as deleted)."""
    targets = [(host, "DELETE", path) for host, path in locate_all(volumes, key)]
    failed = []
    for (host, _, _), result in zip(targets, await pool.request_many(targets)):
        if isinstance(result, VolumeError):
            failed.append(str(result))
        elif result.status not in (200, 204, 404):
            failed.append(f"volume {host} answered {result.status} to DELETE")
    return failed


async def exists(pool: Pool, volume: str, key: bytes) -> int | None:
    """The size of the key's file on `volume`, or None when it is not there."""
    host, path = locate(volume, key)
    resp = await pool.request(host, "HEAD", path)
    if resp.status == 200:
        return int(resp.headers.get(b"content-length", b"0"))
    if resp.status == 404:
        return None
    raise VolumeError(host, f"answered {resp.status} to HEAD")


async def copy(pool: Pool, key: bytes, src: str, dst: str) -> None:
    """Stream the key's file from volume `src` to volume `dst` (raises VolumeError)."""
    src_host, src_path = locate(src, key)
    dst_host, dst_path = locate(dst, key)
    conn, body = await pool.download(src_host, src_path)
    try:
        if conn.status != 200:
            raise VolumeError(src_host, f"answered {conn.status} to GET of {src_path}")
        length = conn.headers.get(b"content-length")
        upload = await pool.upload(dst_host, dst_path, int(length) if length is not None else None)
        try:
            while chunk := await asyncio.wait_for(body.read(), pool.stall):
                upload.write(chunk)
                if upload.paused:
                    await upload.drain()
            status = await upload.finish()
        except BaseException:
            upload.abort()
            raise
        if status not in (201, 204):
            raise VolumeError(dst_host, f"answered {status} to PUT of {dst_path}")
    except asyncio.TimeoutError:
        raise VolumeError(src_host, f"sent nothing for {pool.stall:g}s") from None
    finally:
        pool.finish_download(conn)
