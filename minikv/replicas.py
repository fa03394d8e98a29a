"""Operations on the files that hold a key's value: where they are, delete them, copy one.

Used by the API (PUT clean-up, DELETE, REBALANCE), by crash recovery and by the admin
commands, so that every place talks to volumes the same way. Values are streamed: a copy
never holds more than a few chunks in memory, or a small file (up to SMALL) whole.
"""

from __future__ import annotations

import asyncio
import hashlib

from minikv.api.digest import StreamingMd5
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
    return await delete_each(pool, [(volumes, key)])


async def delete_each(pool: Pool, files: list[tuple[list[str], bytes]]) -> list[str]:
    """delete_all for many keys (`(volumes, key)` each) at once: every DELETE is sent before any
    answer is awaited, those to one volume sharing a connection and a write."""
    targets = [(host, "DELETE", path) for volumes, key in files for host, path in locate_all(volumes, key)]
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


async def md5_of(pool: Pool, volume: str, key: bytes) -> tuple[int, bytes] | None:
    """(size, md5) of the key's file on `volume`, read back as a stream (hashed off the event
    loop when big); None when there is none; VolumeError if it cannot be read whole."""
    host, path = locate(volume, key)
    conn, body = await pool.download(host, path)
    md5, size = StreamingMd5(), 0
    try:
        if conn.status == 404:
            return None
        if conn.status != 200:
            raise VolumeError(host, f"answered {conn.status} to GET of {path}")
        while chunk := await asyncio.wait_for(body.read(), pool.stall):
            await md5.update(chunk)
            size += len(chunk)
        return size, await md5.digest()
    except asyncio.TimeoutError:
        raise VolumeError(host, f"sent nothing for {pool.stall:g}s") from None
    finally:
        await md5.close()
        pool.finish_download(conn)


SMALL = 32 << 10  # a copy of a file up to this size goes whole, on pipes (see copy_small)


def wrong_size(host: str, path: str, got: int, size: int) -> VolumeError:
    """A copy of the wrong size (truncated, or another value's): never passed on as the key's."""
    return VolumeError(host, f"holds {got} bytes at {path}, and the key's record says {size}: "
                             "that copy is not used (`minikv verify` finds such copies)")


def wrong_md5(host: str, path: str) -> VolumeError:
    """A copy of the right size whose bytes are not the value's (a flipped bit on its disk)."""
    return VolumeError(host, f"holds other bytes at {path} than the key's record says (its md5 differs): "
                             "that copy is not used (`minikv verify -md5` finds such copies)")


async def copy(pool: Pool, key: bytes, src: str, dst: str, size: int | None = None,
               md5: bytes | None = None) -> None:
    """Stream the key's file from volume `src` to volume `dst` (raises VolumeError). `size`
    and `md5`: what the record says of the file; a small one is copied by copy_small, and a
    file of another size or md5 is refused (VolumeError of `src`: the caller tries another
    replica). The last bytes, which make the volume keep the copy, go once the md5 is right."""
    src_host, src_path = locate(src, key)
    dst_host, dst_path = locate(dst, key)
    if size is not None and 0 < size <= SMALL and await copy_small(pool, src_host, src_path, dst_host, dst_path,
                                                                   size, md5):
        return
    conn, body = await pool.download(src_host, src_path)
    digest = StreamingMd5() if md5 else None
    try:
        if conn.status != 200:
            raise VolumeError(src_host, f"answered {conn.status} to GET of {src_path}")
        length = conn.headers.get(b"content-length")
        if size is not None and length is not None and int(length) != size:
            raise wrong_size(src_host, src_path, int(length), size)
        upload = await pool.upload(dst_host, dst_path, int(length) if length is not None else None)
        try:
            held = b""
            while chunk := await asyncio.wait_for(body.read(), pool.stall):
                if held:
                    upload.write(held)
                held = chunk
                if digest is not None:
                    await digest.update(chunk)
                if upload.paused:
                    await upload.drain()
            if digest is not None and await digest.digest() != md5:
                raise wrong_md5(src_host, src_path)
            if held:
                upload.write(held)
            status = await upload.finish()
        except BaseException:
            upload.abort()
            raise
        if status not in (201, 204):
            raise VolumeError(dst_host, f"answered {status} to PUT of {dst_path}")
    except asyncio.TimeoutError:
        raise VolumeError(src_host, f"sent nothing for {pool.stall:g}s") from None
    finally:
        if digest is not None:
            await digest.close()
        pool.finish_download(conn)


async def copy_small(pool: Pool, src_host: str, src_path: str, dst_host: str, dst_path: str,
                     size: int | None = None, md5: bytes | None = None) -> bool:
    """Copy a small file as a GET and a PUT that share their connections and writes with the
    other keys in flight (a streamed copy takes a connection and a write of its own for the
    GET). The GET asks for the first SMALL bytes only, so a file bigger than its record says
    never comes whole into memory. A file of another size than `size` is refused
    (VolumeError); without `size`, one bigger than SMALL gives False: the caller streams it."""
    resp = await pool.request(src_host, "GET", src_path, headers=(("Range", f"bytes=0-{SMALL - 1}"),),
                              pipelined=True)
    if resp.status == 416:
        if size:
            raise wrong_size(src_host, src_path, 0, size)
        return False  # empty, though its record says otherwise: streamed, as before
    if resp.status not in (200, 206):
        raise VolumeError(src_host, f"answered {resp.status} to GET of {src_path}")
    total = len(resp.body)
    if resp.status == 206:
        whole = resp.headers.get(b"content-range", b"").rpartition(b"/")[2]
        total = int(whole) if whole.isdigit() else -1
    if size is not None and total != size:
        raise wrong_size(src_host, src_path, total, size)
    if total != len(resp.body):
        return False  # bigger than SMALL: streamed instead
    if md5 and hashlib.md5(resp.body).digest() != md5:
        raise wrong_md5(src_host, src_path)
    status = (await pool.request(dst_host, "PUT", dst_path, resp.body)).status
    if status not in (201, 204):
        raise VolumeError(dst_host, f"answered {status} to PUT of {dst_path}")
    return True
