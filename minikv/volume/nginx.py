"""The volume server: stock nginx with WebDAV, configured and run by minikv.

A volume is a plain directory tree. nginx serves it: GET/HEAD with sendfile and Range, PUT and
DELETE through the dav module, directory listings as JSON for `rebuild`. This module writes the
nginx config (`render_config`, pure), then runs nginx in the foreground as our child
(`run_volume`), forwards signals to it and exits with it.

Everything nginx writes lives inside the volume directory: uploads are spooled to DIR/body_temp
(the same filesystem as the data, so moving a finished upload into place is one atomic rename,
as in the Go original) and the pid file and other temp folders go to DIR/.nginx. Both folders are
closed to HTTP clients. Started as root, nginx workers run as an unprivileged user that owns the
volume's directories, so no system nginx setup is needed either way.

That user can plant symlinks anywhere in the volume, and root must not follow them: folders are
opened with O_NOFOLLOW (a link is refused, with the reason), owners changed through the open
folder (fchown), DIR/.nginx stays root's and is made anew if it was not, and nginx reaches its
folders and config only through descriptors we opened (/proc/self/fd/N; the config is a memfd of
ours, which nginx's workers do not inherit: it holds the secret),
so renaming or swapping a folder inside the volume later redirects nothing root writes.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

from minikv.ops.disk import ext4_without_journal
from minikv.ops.disk import start_reporter as start_disk_reporter

BODY_TEMP = "body_temp"
SECRET_HEADER = "X-Minikv-Secret"  # the index's proof that a write comes from it
SECRET_CHARS = re.compile(r"[A-Za-z0-9_-]{8,128}")
STATE_DIR = ".nginx"
NOFILE_WANTED = 100_000
STOP_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# SIGTERM and SIGINT make nginx stop at once, SIGQUIT drains connections first,
# SIGHUP re-reads the config, SIGUSR1 reopens logs: each goes to nginx as it came to us.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)


class VolumeError(Exception):
    """A problem the user has to fix before the volume can start; the message says how."""


# ---------------------------------------------------------------- config (pure)


def quote(value: str) -> str:
    """Quote a string for an nginx config file (paths may hold spaces, quotes, `;` or `#`)."""
    if any(ch in value for ch in "\0\r\n"):
        raise VolumeError(f"path {value!r} holds a NUL or line break, which nginx cannot take")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_with_variables(value: str) -> str:
    """Quote a string for a directive that expands `$variables` (like `root`): nginx has no
    escape for `$`, so a literal dollar becomes `${dollar}`, defined by a `geo` block."""
    return quote(value.replace("$", "${dollar}"))


def listen_address(host: str, port: int) -> str:
    if not host:
        return str(port)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"{host}:{port}"


def render_config(
    port: int,
    directory: str,
    host: str = "",
    user: tuple[str, str] | None = None,
    prefix_dir: str | None = None,
    nofile: int | None = None,
    secret: str = "",
    signed: bool = False,
    body_temp: str | None = None,
) -> str:
    """The nginx config serving `directory` (absolute) on `host:port`.

    `user` is (user, group) for the workers when nginx starts as root; `prefix_dir` holds the pid
    file and temp folders (default DIR/.nginx), `body_temp` the uploads in progress (default
    DIR/body_temp); `nofile` raises the workers' open-file limit.
    With a `secret`, only requests carrying it (the index's) may PUT, DELETE or list folders;
    anyone may still GET a file, and with `signed` only through a redirect the index signed.
    """
    if secret and not SECRET_CHARS.fullmatch(secret):
        raise VolumeError("a secret may hold only letters, digits, '-' and '_' (8 to 128 of them)")
    if signed and not secret:
        raise VolumeError("signed redirects need a secret: give -secret (or MINIKV_SECRET)")
    directory = directory.rstrip("/") or "/"
    prefix_dir = prefix_dir or os.path.join(directory, STATE_DIR)
    state = prefix_dir.rstrip("/")
    body_temp = body_temp or os.path.join(directory, BODY_TEMP)
    lines = ["# written by minikv volume; regenerated on every start, edits are lost", ""]
    if user is not None:
        lines.append(f"user {quote(user[0])} {quote(user[1])};")
    lines += [
        "daemon off;",
        "master_process on;",
        "worker_processes auto;",
        *([f"worker_rlimit_nofile {nofile};"] if nofile else []),
        f"pid {quote(state + '/nginx.pid')};",
        "error_log stderr;",
        "",
        "events {",
        "    worker_connections 4096;",
        "    multi_accept on;",
        "}",
        "",
        "http {",
        "    sendfile on;",
        "    sendfile_max_chunk 1m;",
        "    tcp_nopush on;",
        "    tcp_nodelay on;",
        "    server_tokens off;",
        # every value is bytes; no guessing a type from a file name
        "    types { }",
        "    default_type application/octet-stream;",
        "    access_log off;",
        # a missing file is an answer (404), not an error worth a log line
        "    log_not_found off;",
        "    keepalive_timeout 300s;",
        "    keepalive_requests 100000;",
        # a PUT body goes to its file in 256 KB writes instead of 16 KB ones: half nginx's CPU
        # on a 256 MB PUT; costs at most 256 KB of memory per upload in flight
        "    client_body_buffer_size 256k;",
        f"    client_body_temp_path {quote(body_temp)};",
        f"    proxy_temp_path {quote(state + '/proxy_temp')};",
        f"    fastcgi_temp_path {quote(state + '/fastcgi_temp')};",
        f"    uwsgi_temp_path {quote(state + '/uwsgi_temp')};",
        f"    scgi_temp_path {quote(state + '/scgi_temp')};",
    ]
    if "$" in directory:
        lines += ['    geo $dollar { default "$"; }']
    guard: list[str] = []
    if secret:
        # map matches plain strings ignoring case; a `~` regex compares the secret exactly
        lines += [
            f'    map $http_{SECRET_HEADER.lower().replace("-", "_")} $minikv_trusted {{ default 0; "~^{secret}$" 1; }}',
            '    map "$minikv_trusted:$request_method:$uri" $minikv_denied {',
            "        default 1;",
            '        "~^1:" 0;',  # the index may do anything
            '        "~^0:(GET|HEAD):.*[^/]$" 0;',  # anyone may read a file, not list a folder
            "    }",
        ]
        guard = ["            if ($minikv_denied) { return 403; }"]
    if signed:
        # secure_link: "" for a bad signature, "0" when expired, "1" when good
        lines += ['    map "$minikv_trusted$secure_link" $minikv_unsigned { default 1; "~^1" 0; "01" 0; }']
        guard += [
            "            secure_link $arg_md5,$arg_expires;",
            f'            secure_link_md5 "$secure_link_expires$uri {secret}";',
            "            if ($minikv_unsigned) { return 403; }",
        ]
    lines += [
        "",
        "    server {",
        f"        listen {listen_address(host, port)} default_server backlog=4096;",
        # a folder is always listed: an index.html put in one (a stray file) was served in its
        # place and hid its files from rebuild; no key's file name holds a "."
        "        index .minikv-no-index;",
        "",
        "        location / {",
        *guard,
        f"            root {quote_with_variables(directory)};",
        "            client_max_body_size 0;",
        "            dav_methods PUT DELETE;",
        "            dav_access user:rw group:rw all:r;",
        "            create_full_put_path on;",
        "            autoindex on;",
        "            autoindex_format json;",
        "        }",
        "",
        # DELETE / would remove the whole volume: the root is for reading only
        "        location = / {",
        *guard,
        f"            root {quote_with_variables(directory)};",
        "            limit_except GET { deny all; }",
        "            autoindex on;",
        "            autoindex_format json;",
        "        }",
        "",
        # nginx's own folders: half-written uploads and the pid file are nobody's business
        f"        location = /{BODY_TEMP} {{ return 403; }}",
        f"        location ^~ /{BODY_TEMP}/ {{ return 403; }}",
        f"        location = /{STATE_DIR} {{ return 403; }}",
        f"        location ^~ /{STATE_DIR}/ {{ return 403; }}",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- finding nginx


def find_nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise VolumeError(
            "nginx is not installed (a volume server is nginx with WebDAV).\n"
            "Install it: `apt-get install nginx` (Debian/Ubuntu), `dnf install nginx`, `apk add nginx`."
        )
    return found


def check_nginx(nginx: str) -> None:
    """nginx must be built with the dav module (it handles PUT and DELETE)."""
    try:
        out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(f"cannot run `{nginx} -V`: {e}") from None
    if "http_dav_module" not in out.stdout + out.stderr:
        raise VolumeError(
            f"{nginx} was built without the WebDAV module (`nginx -V` does not list "
            "--with-http_dav_module), so it cannot take PUT and DELETE.\n"
            "Install a build that has it: Debian/Ubuntu's `nginx` package does."
        )


# ---------------------------------------------------------------- preparing the folder


def worker_user() -> tuple[str, str, int, int] | None:
    """(user, group, uid, gid) for nginx's workers when we run as root, else None: a normal
    user's nginx cannot switch users, and its workers simply run as that user."""
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, grp.getgrgid(entry.pw_gid).gr_name, entry.pw_uid, entry.pw_gid
    raise VolumeError("running as root, but neither user www-data nor nobody exists for nginx's workers")


def fd_path(fd: int) -> str:
    """A path to the folder open as `fd`, for nginx (which inherits it): it names that folder
    whatever is renamed or replaced inside the volume later."""
    return f"/proc/self/fd/{fd}"


def open_real_dir(name: str, dir_fd: int | None, shown: str) -> int:
    """Open folder `name` (relative to `dir_fd`) without following a symlink, or refuse it."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise VolumeError(
                f"{shown} is a symlink or not a folder. minikv volume follows no links in a volume (the "
                "user nginx's workers run as could plant one to take over files outside it): remove it, "
                "or make it a real folder, and start again."
            ) from None
        raise VolumeError(f"cannot open {shown}: {e.strerror}") from None


def take_over_directories(top: int, uid: int, gid: int) -> int:
    """Make every data directory of the volume open as `top` belong to the workers' user, so PUT
    can create and replace files and DELETE can remove them. Files can stay as they are (a
    rename or unlink only needs the directory): data written by another user, the Go original
    run as root say, just works. Symlinks are neither followed nor changed: fwalk opens each
    folder without following links and checks it is the one it listed, and the owner is
    changed through that descriptor. Returns how many data directories changed owner."""
    os.fchown(top, uid, gid)
    changed = 0
    # nginx's own folders are set up by prepare_directory
    for root, fd, _files in walk_folders(top, skip=(BODY_TEMP, STATE_DIR)):
        if root == ".":
            continue
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            changed += 1
    return changed


def walk_folders(top: int, skip: tuple[str, ...] = (), onerror=None) -> Iterator[tuple[str, int, list[str]]]:
    """(path below `top`, its open descriptor, the names of what in it is not a folder) of the
    folder open as `top` and every folder below it, parents first; folders named in `skip` right
    below `top` are left out. As os.fwalk(follow_symlinks=False): each folder is opened through
    its parent without following a link (one swapped in since it was listed is skipped). But
    with a stack instead of recursion, and its parent closed once its last child is open: the
    Go original's folder chains run over a thousand deep (fwalk dies of RecursionError there).
    A folder that cannot be opened or read is skipped after `onerror(path, error)` when given (as
    fwalk's onerror), else the error is raised."""
    def entries(fd: int) -> tuple[list[str], list[str]]:
        folders, others = [], []
        with os.scandir(fd) as it:
            for e in it:
                (folders if e.is_dir(follow_symlinks=False) else others).append(e.name)
        return folders, others

    folders, others = entries(top)
    stack = [(top, ".", [f for f in folders if f not in skip])]
    try:
        yield ".", top, others
        while stack:
            fd, path, names = stack[-1]
            if not names:
                stack.pop()
                if fd != top:
                    os.close(fd)
                continue
            name = names.pop()
            below = name if path == "." else path + "/" + name
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone since it was listed, or a link now
                if onerror is None:
                    raise
                onerror(below, e)
                continue
            if not names:  # its last child: nothing more to open through it
                stack.pop()
                if fd != top:
                    os.close(fd)
            try:
                folders, others = entries(child)
            except OSError as e:
                os.close(child)
                if onerror is None:
                    raise
                onerror(below, e)
                continue
            except BaseException:
                os.close(child)
                raise
            stack.append((child, below, folders))
            yield below, child, others
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)


def _own_state_dir(top: int, directory: str) -> int:
    """DIR/.nginx, open, belonging to root and writable only by it: nginx's master writes its
    pid file and makes its temp folders there as root. One the workers' user owned (as minikv
    made it before) may hold its links, so it is made anew."""
    shown = os.path.join(directory, STATE_DIR)
    fd = open_real_dir(STATE_DIR, top, shown)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        try:
            # through the open DIR (rmtree's dir_fd needs Python 3.11); rmtree unlinks links, never follows them
            shutil.rmtree(os.path.join(fd_path(top), STATE_DIR))
            os.mkdir(STATE_DIR, 0o755, dir_fd=top)
        except OSError as e:
            raise VolumeError(f"cannot make {shown} anew: {e.strerror}") from None
        print(f"minikv volume: made {shown} anew: it belonged to another user, and nginx writes there as root",
              file=sys.stderr)
        fd = open_real_dir(STATE_DIR, top, shown)
        if os.fstat(fd).st_uid != os.geteuid():
            raise VolumeError(f"{shown} was replaced while it was being made: start again")
    os.fchmod(fd, 0o755)
    return fd


def can_write_as(directory: str, uid: int, gid: int) -> bool:
    """Ask the kernel, in a child that becomes uid:gid, whether it may write into directory
    (this sees every parent's permissions and any ACL, which a mode-bit check would not)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            ok = os.access(directory, os.W_OK | os.X_OK)
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def prepare_directory(directory: str, user: tuple[str, str, int, int] | None) -> tuple[int, int]:
    """Make the volume's folders and hand the data to the workers' user; returns the open
    folders nginx is to use (body_temp, .nginx), checked to be real folders."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise VolumeError(f"cannot create {directory}: {e.strerror}") from None
    top = open_real_dir(directory, None, directory)
    try:
        for name in (BODY_TEMP, STATE_DIR):
            try:
                os.mkdir(name, 0o755, dir_fd=top)
            except FileExistsError:
                pass
            except OSError as e:
                raise VolumeError(f"cannot create {os.path.join(directory, name)}: {e.strerror}") from None
        body = open_real_dir(BODY_TEMP, top, os.path.join(directory, BODY_TEMP))
        if user is None:
            if not os.access(directory, os.W_OK | os.X_OK):
                raise VolumeError(f"{directory} is not writable by you: pick another folder or fix its owner")
            return body, open_real_dir(STATE_DIR, top, os.path.join(directory, STATE_DIR))
        name, _group, uid, gid = user
        state = _own_state_dir(top, directory)
        try:
            os.fchown(body, uid, gid)
            changed = take_over_directories(top, uid, gid)
        except OSError as e:
            raise VolumeError(
                f"cannot give {e.filename or directory} to {name}, the user nginx's workers run as: {e.strerror}. "
                "Fix its owner by hand, or start minikv volume as that user."
            ) from None
        if changed:
            print(f"minikv volume: gave {changed} directories under {directory} to {name}", file=sys.stderr)
        if not can_write_as(directory, uid, gid):
            raise VolumeError(
                f"nginx's workers run as {name}, who cannot reach {directory}: a parent folder is closed "
                f"to other users. Open it (`chmod o+x` on each parent) or put the volume elsewhere."
            )
        return body, state
    finally:
        os.close(top)


def open_file_limit() -> int | None:
    """As many open files for the workers as the hard limit allows, up to NOFILE_WANTED
    (even root may not go past it: containers often lack CAP_SYS_RESOURCE)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return NOFILE_WANTED
    return min(NOFILE_WANTED, hard)


# ---------------------------------------------------------------- running nginx


def _die_with_parent() -> None:
    """In the child before exec: if minikv dies, even by SIGKILL, the kernel sends nginx's
    master SIGTERM, so no nginx is left serving a volume nobody manages."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: stopping nginx is then up to run_volume's cleanup


def start_nginx(nginx: str, prefix_dir: str, config_path: str, fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [nginx, "-e", "stderr", "-p", prefix_dir + "/", "-c", config_path],
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
        pass_fds=fds,
    )


def stop_nginx(proc: subprocess.Popen) -> None:
    """Stop our nginx child (only that pid) and wait for it: fast stop, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def serve(nginx: str, directory: str, config: str, port: int, folders: tuple[int, int]) -> int:
    """Run nginx on `config` until it exits, forward signals. nginx inherits the open folders
    (body_temp, .nginx) and reads the config from our memory: no file of it is left anywhere,
    even by a SIGKILLed minikv, and none can be swapped under nginx (which reads it again on
    SIGHUP, while we run)."""
    conf = os.memfd_create("minikv-nginx.conf")
    os.write(conf, config.encode())
    previous = {}
    proc = None
    early: list[int] = []  # signals that came before nginx did: sent to it once it exists

    def forward(signum, _frame):
        if proc is None:
            early.append(signum)
        else:
            proc.send_signal(signum)  # a no-op once nginx has been reaped: never a stranger's pid

    try:
        # the handlers come first: a SIGHUP between nginx's start and them would kill us, and
        # nginx with us (PDEATHSIG), though the port already answered
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        # the config by our own descriptor's path, not one nginx inherits: its master (root, or
        # us) opens it, reads it and closes it, so the workers never hold it. Their user (www-data,
        # shared with other services) could read an inherited one through /proc, secret and all
        proc = start_nginx(nginx, fd_path(folders[1]), f"/proc/{os.getpid()}/fd/{conf}", folders)
        for signum in early:
            proc.send_signal(signum)
        print(f"minikv volume: serving {directory} on :{port} (nginx pid {proc.pid})", file=sys.stderr)
        start_disk_reporter(directory)  # DIR/.minikv-disk.json: the index shows this disk's space
        return exit_code(proc.wait())
    finally:
        if proc is not None:
            stop_nginx(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for fd in (conf, *folders):
            os.close(fd)


def run_volume(port: int, directory: str, host: str = "", secret: str = "", signed: bool = False) -> int:
    """`minikv volume`: serve `directory` with nginx on `host:port` until nginx exits (or we are
    told to stop); returns nginx's exit code, or 1 with a message when it cannot start."""
    # the links of the path given are the admin's: resolved once, the volume's own are refused
    directory = os.path.realpath(directory)
    folders = None
    try:
        nginx = find_nginx()
        check_nginx(nginx)
        user = worker_user()
        folders = prepare_directory(directory, user)
        config = render_config(
            port,
            directory,
            host,
            user=user[:2] if user else None,
            prefix_dir=fd_path(folders[1]),
            body_temp=fd_path(folders[0]),
            nofile=open_file_limit(),
            secret=secret,
            signed=signed,
        )
    except VolumeError as e:
        if folders is not None:
            for fd in folders:
                os.close(fd)
        print(f"minikv volume: {e}", file=sys.stderr)
        return 1
    if device := ext4_without_journal(directory):
        print(f"minikv volume: warning: {directory} is on an ext4 without a journal (/dev/{device}): files "
              "created there soon after many were deleted cost nginx up to 3 times the CPU. `tune2fs -j "
              f"/dev/{device}` adds a journal, used from the next mount (README: the volumes' file system)",
              file=sys.stderr)
    return serve(nginx, directory, config, port, folders)
