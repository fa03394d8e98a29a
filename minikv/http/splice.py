"""Forwarding a volume's answer to a client inside the kernel: os.splice moves the bytes from
the volume's socket into a pipe and from the pipe into the client's socket, with no copy
through Python.

Why: botocore follows no redirect, so an S3 GET streams the value through the index. Copied,
every byte is read into a bytes object (uvloop), copied again by the response parser, then
written: on a shared 2-core machine the index's CPU time per byte is what its wall time follows.
bench/s3get_ab.py, 256 MB, two runs: the index's CPU per GET 0.29-0.36 s copied, 0.11-0.12 s
spliced (nginx as a proxy: 0.21-0.25 s), its time 1.42-1.71x the direct nginx GET copied,
1.08-1.10x spliced (nginx as a proxy: 1.19-1.34x).

How it lives beside the event loop: both transports stay open and idle while we splice. The
volume's is paused for reading (nothing else reads it); the client's has an empty write buffer
and nothing else writes to it (a pipelined request waits for this answer; the head and the body
bytes that came with it are written and drained first). Readiness is watched on duplicates of
the two descriptors, as uvloop refuses to watch a descriptor a transport owns. The volume's
connection is not reused afterwards: its parser never saw the body.
"""

from __future__ import annotations

import asyncio
import fcntl
import os

AVAILABLE = hasattr(os, "splice")  # Linux
SPLICE_MIN = 1 << 20  # a shorter answer is copied: little to gain, for a pipe and two dup()s
PIPE_SIZE = 1 << 20  # the most pipe-max-size allows an unprivileged process by default
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class SourceFailed(Exception):
    """The volume ended its answer early or sent nothing for `stall` seconds."""


class ClientLeft(Exception):
    """The client closed its connection."""


class Link:
    """The descriptors one forwarding needs: duplicates of both sockets' and a pipe."""

    def __init__(self, src, dst):
        self.fds: list[int] = []
        try:
            self.src = self._keep(os.dup(src.get_extra_info("socket").fileno()))
            self.dst = self._keep(os.dup(dst.get_extra_info("socket").fileno()))
            self.r, self.w = (self._keep(fd) for fd in os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC))
            try:
                fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default 64 KB pipe works, with more moves
            self.size = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def link(src, dst) -> Link | None:
    """A Link between two transports, or None when it cannot be made (out of open files, a
    socket already closed): the caller copies instead."""
    try:
        return Link(src, dst)
    except (OSError, AttributeError):  # uvloop gives no socket once a transport is closed
        return None


async def forward(link: Link, count: int, stall: float, client_gone=lambda: False) -> None:
    """Move exactly `count` bytes from the link's source socket to its client socket, then close
    the link. The source's transport must be paused for reading and the client's write buffer
    empty. `client_gone()` is checked between moves (the client's protocol learns of a close
    first)."""
    loop = asyncio.get_running_loop()
    src, dst, r, w, size = link.src, link.dst, link.r, link.w, link.size
    try:
        left, held = count, 0  # bytes still to take from the volume, bytes in the pipe
        while left or held:
            if client_gone():
                raise ClientLeft("client closed the connection")
            moved = False
            if left and held < size:
                try:
                    n = os.splice(src, w, min(left, size - held), flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as e:
                    raise SourceFailed(f"closed the connection mid-answer ({e.strerror})") from None
                if n == 0:
                    raise SourceFailed(f"closed the connection with {left} bytes of its answer to come")
                if n > 0:
                    left, held, moved = left - n, held + n, True
            if held:
                try:
                    n = os.splice(r, dst, held, flags=_FLAGS)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    raise ClientLeft(f"client connection failed ({e.strerror})") from None
                if n > 0:
                    held, moved = held - n, True
            if not moved:
                # with bytes in the pipe, wait for the client only: the volume's splice may have
                # failed for want of room in the pipe (its slots take the socket's buffers, not
                # whole pages), and its socket, readable all along, would wake us in a spin
                await _ready(loop, None if held else src, dst if held else None, stall)
    finally:
        link.close()


async def _ready(loop, src_fd: int | None, dst_fd: int | None, stall: float) -> None:
    """Wait until the source can be read or the client written, whichever is asked. Waiting
    for the source alone is bounded by `stall`; waiting for a slow client is not (as the
    copying loop's drain), but a client that leaves makes its socket ready (with the error)."""
    fut = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    timer = None
    if src_fd is not None:
        loop.add_reader(src_fd, wake)
        if dst_fd is None:
            timer = loop.call_later(stall, lambda: fut.done() or fut.set_exception(
                SourceFailed(f"sent nothing for {stall:g}s")))
    if dst_fd is not None:
        loop.add_writer(dst_fd, wake)
    try:
        await fut
    finally:
        if src_fd is not None:
            loop.remove_reader(src_fd)
        if dst_fd is not None:
            loop.remove_writer(dst_fd)
        if timer is not None:
            timer.cancel()
