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
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

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
) -> str:
    """The nginx config serving `directory` (absolute) on `host:port`.

    `user` is (user, group) for the workers when nginx starts as root; `prefix_dir` holds the pid
    file and temp folders (default DIR/.nginx); `nofile` raises the workers' open-file limit.
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
    body_temp = os.path.join(directory, BODY_TEMP)
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


def take_over_directories(directory: str, uid: int, gid: int) -> int:
    """Make every data directory of the volume belong to the workers' user, so PUT can create
    and replace files and DELETE can remove them. Files can stay as they are (a rename or
    unlink only needs the directory): data written by another user, the Go original run as
    root say, just works. Returns how many data directories changed owner."""
    for own in (directory, os.path.join(directory, BODY_TEMP), os.path.join(directory, STATE_DIR)):
        os.chown(own, uid, gid)
    changed = 0
    for root, dirs, _files in os.walk(directory):
        if root == directory:
            # nginx's own folders: nginx sets up their insides itself
            dirs[:] = [d for d in dirs if d not in (BODY_TEMP, STATE_DIR)]
            continue
        st = os.lstat(root)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(root, uid, gid, follow_symlinks=False)
            changed += 1
    return changed


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


def prepare_directory(directory: str, user: tuple[str, str, int, int] | None) -> None:
    for path in (directory, os.path.join(directory, BODY_TEMP), os.path.join(directory, STATE_DIR)):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise VolumeError(f"cannot create {path}: {e.strerror}") from None
    if user is None:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise VolumeError(f"{directory} is not writable by you: pick another folder or fix its owner")
        return
    name, _group, uid, gid = user
    try:
        changed = take_over_directories(directory, uid, gid)
    except OSError as e:
        raise VolumeError(
            f"cannot give {e.filename} to {name}, the user nginx's workers run as: {e.strerror}. "
            "Fix its owner by hand, or start minikv volume as that user."
        ) from None
    if changed:
        print(f"minikv volume: gave {changed} directories under {directory} to {name}", file=sys.stderr)
    if not can_write_as(directory, uid, gid):
        raise VolumeError(
            f"nginx's workers run as {name}, who cannot reach {directory}: a parent folder is closed "
            f"to other users. Open it (`chmod o+x` on each parent) or put the volume elsewhere."
        )


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


def start_nginx(nginx: str, prefix_dir: str, config_path: str) -> subprocess.Popen:
    return subprocess.Popen(
        [nginx, "-e", "stderr", "-p", prefix_dir + "/", "-c", config_path],
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
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


def serve(nginx: str, directory: str, config: str, port: int) -> int:
    """Write the config to a temp file, run nginx on it until it exits, forward signals."""
    prefix_dir = os.path.join(directory, STATE_DIR)
    # beside the pid file rather than in /tmp: a SIGKILLed minikv leaves no litter outside the volume
    fd, config_path = tempfile.mkstemp(prefix="nginx-", suffix=".conf", dir=prefix_dir)
    previous = {}
    proc = None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(config)
        # the master reads the config as root or as us; workers never need it
        proc = start_nginx(nginx, prefix_dir, config_path)
        child = proc

        def forward(signum, _frame):
            child.send_signal(signum)  # a no-op once nginx has been reaped: never a stranger's pid

        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        print(f"minikv volume: serving {directory} on :{port} (nginx pid {proc.pid})", file=sys.stderr)
        start_disk_reporter(directory)  # DIR/.minikv-disk.json: the index shows this disk's space
        return exit_code(proc.wait())
    finally:
        if proc is not None:
            stop_nginx(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config_path)


def run_volume(port: int, directory: str, host: str = "", secret: str = "", signed: bool = False) -> int:
    """`minikv volume`: serve `directory` with nginx on `host:port` until nginx exits (or we are
    told to stop); returns nginx's exit code, or 1 with a message when it cannot start."""
    directory = os.path.abspath(directory)
    try:
        nginx = find_nginx()
        check_nginx(nginx)
        user = worker_user()
        prepare_directory(directory, user)
        config = render_config(
            port,
            directory,
            host,
            user=user[:2] if user else None,
            prefix_dir=os.path.join(directory, STATE_DIR),
            nofile=open_file_limit(),
            secret=secret,
            signed=signed,
        )
    except VolumeError as e:
        print(f"minikv volume: {e}", file=sys.stderr)
        return 1
    return serve(nginx, directory, config, port)
