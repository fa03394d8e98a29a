"""The `minikv` command: Go-style flags (single or double dash, `-flag value` or `-flag=value`,
before or after the command word) so scripts written for minikeyvalue's `mkv` keep working.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

USAGE = """\
Usage: minikv [flags] <command> [args]

Commands:
  server      run the index server (needs -volumes and -db)
  volume DIR  run a volume server: nginx serving DIR (-port, or the PORT env var)
  up          run a local cluster: 3 volumes + index on port 3000, data under -data
  rebuild     rebuild the index at -db from the volumes' files
  rebalance   move every key to the volumes its placement names now
  verify      check that every key has all its replicas
  repair      re-replicate what verify finds missing
  gc [DIR...] remove unlinked keys' files, dead processes' locks, old temp files in DIR/body_temp
  copy-index FROM TO  copy an index into an empty one: LMDB folder or postgresql:// URL, either way
  status      show a running server's volumes, index and requests (-server host:port); exits 1 if not ready

Flags:
"""


class UsageError(Exception):
    pass


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "t", "true", "yes", "on"):
        return True
    if low in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration for the forms people write: `1s`, `500ms`, `1m30s`, `2.5s`.
    A bare number is taken as seconds; `7d` (days) is accepted too, as Go's is not."""
    try:
        return float(text)
    except ValueError:
        pass
    total, number, i = 0.0, "", 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        for unit in ("ns", "us", "µs", "ms", "s", "m", "h", "d"):
            if text.startswith(unit, i) and number:
                total += float(number) * _UNITS[unit]
                number, i = "", i + len(unit)
                break
        else:
            raise ValueError(f"not a duration: {text!r} (try 1s or 500ms)")
    if number:
        raise ValueError(f"not a duration: {text!r} (missing unit, try 1s or 500ms)")
    return total


@dataclass
class Flag:
    kind: type | str  # int, str, bool, or "duration"
    default: object
    help: str


FLAGS: dict[str, Flag] = {
    "port": Flag(int, 3000, "port to listen on (volume: 3001 or $PORT)"),
    "host": Flag(str, "", "address to listen on (default: all)"),
    "db": Flag(str, "", "path to the index database (a directory)"),
    "volumes": Flag(str, "", "volume servers, comma separated host:port"),
    "replicas": Flag(int, 3, "copies of each value"),
    "subvolumes": Flag(int, 10, "subvolumes (disks) per volume server"),
    "protect": Flag(bool, False, "refuse DELETE unless the key was UNLINKed first"),
    "fallback": Flag(str, "", "server to redirect to for keys not found"),
    "md5sum": Flag(bool, True, "compute and store the md5 of every value"),
    "voltimeout": Flag("duration", 1.0, "timeout for requests to volume servers"),
    "v": Flag(bool, False, "verbose: log every request (one access-log line each)"),
    "log-json": Flag(bool, False, "with -v: log each request as a JSON object per line"),
    "metrics-port": Flag(int, 0, "server: port of the operations listener (/metrics, /healthz, /readyz, a status "
                                 "page at /); 0: off (up: -port + 100)"),
    "workers": Flag(int, 0, "index worker processes (default: one per core); rebuild, verify, rebalance: "
                          "their processes (default 2)"),
    "verify-get": Flag(bool, False, "ask a replica (HEAD) before every redirect, as the Go original"),
    "fsync": Flag(bool, False, "fsync every index commit (survives power loss, slower writes)"),
    "secret": Flag(str, "", "shared secret: volumes take PUT/DELETE/listings only with it, the index sends it "
                            "(or $MINIKV_SECRET; `up` makes one)"),
    "signed": Flag("duration", 0.0, "redirects carry a signature valid this long (server); volumes refuse "
                                    "unsigned reads (volume, any value > 0)"),
    "max-value-size": Flag(int, 0, "largest value a PUT may store, in bytes (413 above; 0: no limit)"),
    "max-connections": Flag(int, 10000, "client connections per worker; more get 503"),
    "worker-timeout": Flag("duration", 15.0, "a worker whose event loop has not turned this long (stuck) is "
                                             "killed and replaced, its writes undone (0: never)"),
    "max-header-bytes": Flag(int, 65536, "request headers larger than this get 431"),
    "max-url": Flag(int, 8192, "request targets longer than this get 414"),
    "header-timeout": Flag("duration", 10.0, "time to send a request's headers (408 after)"),
    "body-timeout": Flag("duration", 60.0, "longest pause inside a request body (408 after)"),
    "body-min-rate": Flag(int, 1024, "slowest average rate of a request body in bytes/s, after its first "
                                     "-body-timeout (408 below; 0: no limit)"),
    "idle-timeout": Flag("duration", 75.0, "keep-alive connections idle this long are closed"),
    "data": Flag(str, "data", "up: folder that holds the volumes and the index"),
    "postgres": Flag(bool, False, "up: the index on a PostgreSQL of its own (DATA/postgres), served by two index "
                                  "servers (-port and -port + 4)"),
    # 64: an admin command mostly waits on the volumes (here rebalance took 55 s at 64, 92-128 s at 16)
    "concurrency": Flag(int, 64, "admin commands: transfers (moves, listings, checks) at once"),
    "dry-run": Flag(bool, False, "admin commands: report what would change, change nothing"),
    "force": Flag(bool, False, "rebuild: write into a non-empty index"),
    "md5": Flag(bool, False, "verify, repair: also check every replica's md5; rebuild: compute it (reads all data)"),
    "delete-orphans": Flag(bool, False, "repair, gc: delete files that no record points to"),
    "age": Flag("duration", 3600.0, "gc: only unlinked keys (by write time), orphans and temp files older than this "
                                   "(a volume's temp files and empty folders: never younger than 10m)"),
    "uploads-older-than": Flag("duration", 7 * 86400.0, "gc: abort S3 multipart uploads started longer ago than "
                                                        "this, with their parts (S3's AbortIncompleteMultipartUpload; "
                                                        "default 7 days: 168h or 7d)"),
    "server": Flag(str, "", "rebalance: run online through this running index (host:port)"),
    "s3-access-key": Flag(str, "", "S3: require SigV4 signatures with this access key "
                                   "(or $MINIKV_S3_ACCESS_KEY), and the pair as HTTP Basic on the plain "
                                   "API (see -open-api); unset: nothing is checked"),
    "s3-secret-key": Flag(str, "", "S3: the secret key for -s3-access-key (or $MINIKV_S3_SECRET_KEY, "
                                   "which keeps it out of `ps`)"),
    "s3-secret-key-file": Flag(str, "", "read -s3-secret-key from this file (its first line)"),
    "open-api": Flag(str, "", "with S3 credentials set, what the plain API serves without them: none, "
                              "read (GET, HEAD, ?list) or all (default none: plain-API requests "
                              "need HTTP Basic, curl -u KEY:SECRET)"),
}


@dataclass
class Args:
    command: str = ""
    positionals: list[str] = field(default_factory=list)
    flags: dict[str, object] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)

    def __getattr__(self, name: str):
        try:
            return self.flags[name.replace("_", "-")]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def volume_list(self) -> list[str]:
        return [v.strip() for v in str(self.flags["volumes"]).split(",") if v.strip()]


def _convert(name: str, text: str):
    kind = FLAGS[name].kind
    try:
        if kind is bool:
            return parse_bool(text)
        if kind == "duration":
            return parse_duration(text)
        return kind(text)
    except ValueError as e:
        raise UsageError(f"invalid value {text!r} for flag -{name}: {e}") from None


def parse_args(argv: list[str]) -> Args:
    args = Args(flags={name: f.default for name, f in FLAGS.items()})
    i = 0
    only_positionals = False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if only_positionals or not arg.startswith("-") or arg == "-":
            args.positionals.append(arg)
            continue
        if arg == "--":
            only_positionals = True
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name in ("h", "help"):
            raise UsageError("")
        if name not in FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if FLAGS[name].kind is bool and not eq:
            args.flags[name] = True
        else:
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
                i += 1
            args.flags[name] = _convert(name, value)
        args.given.add(name)
    if args.positionals:
        args.command, args.positionals = args.positionals[0], args.positionals[1:]
    if "secret" not in args.given:
        args.flags["secret"] = os.environ.get("MINIKV_SECRET", "")
    if args.flags["s3-secret-key-file"]:
        if "s3-secret-key" in args.given:
            raise UsageError("give -s3-secret-key or -s3-secret-key-file, not both")
        from minikv.private import read_secret_file

        try:
            args.flags["s3-secret-key"] = read_secret_file(str(args.flags["s3-secret-key-file"]))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read -s3-secret-key-file: {e}") from None
    return args


def _shown_default(f: Flag) -> str:
    """A default as Go's flag package shows it: nothing for a zero value, strings quoted."""
    if not f.default or "(default" in f.help:
        return ""
    if f.kind is bool:
        return " (default true)"
    if f.kind == "duration":
        return f" (default {go_duration(f.default)})"
    return f' (default "{f.default}")' if f.kind is str else f" (default {f.default})"


def go_duration(seconds: float) -> str:
    """Seconds written as Go's time.Duration prints them: 1s, 1m15s, 1h0m0s, 500ms."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h:.0f}h{m:.0f}m{sec:g}s"
    return f"{m:.0f}m{sec:g}s" if m else f"{sec:g}s"


def usage() -> str:
    lines = [USAGE]
    for name, f in FLAGS.items():
        kind = {bool: "", str: " string", int: " int", "duration": " duration"}[f.kind]
        lines.append(f"  -{name}{kind}\n        {f.help}{_shown_default(f)}")
    return "\n".join(lines)


# The flags a volume server reads; and those of `up` and the admin commands, which the index
# server does not. Any other given to them is said to do nothing there: a limit that seems set
# but is not is worse than none.
VOLUME_READS = frozenset(("port", "host", "secret", "signed"))
SERVER_IGNORES = frozenset(("data", "postgres", "concurrency", "dry-run", "force", "md5", "delete-orphans", "age",
                            "uploads-older-than", "server"))


def unused_flags(args: Args) -> list[str]:
    """The flags given to `volume` or `server` that they do not read."""
    if args.command == "volume":
        return sorted(n for n in args.given if n not in VOLUME_READS)
    if args.command == "server":
        return sorted(n for n in args.given if n in SERVER_IGNORES)
    return []


def _need(args: Args, *names: str) -> None:
    for name in names:
        if not args.flags[name]:
            raise UsageError(f"{args.command} needs -{name}")


def run(args: Args) -> int:
    cmd = args.command
    from minikv.private import argv_warnings, keep_index_private

    for line in argv_warnings(args.given):
        print(f"minikv {cmd}: {line}", file=sys.stderr)
    if unused := unused_flags(args):
        whose = "the index server's (minikv server) or the admin commands'" if cmd == "volume" else \
            "`up`'s or the admin commands'"
        print(f"minikv {cmd}: warning: {', '.join('-' + n for n in unused)} {'does' if len(unused) == 1 else 'do'} "
              f"nothing here: {'it is' if len(unused) == 1 else 'they are'} {whose}", file=sys.stderr)
    from minikv.index.pg import password_warning

    for db in [str(args.db or ""), *(args.positionals if cmd == "copy-index" else [])]:
        if line := password_warning(db):
            print(f"minikv {cmd}: {line}", file=sys.stderr)
    if cmd in ("server", "rebuild", "rebalance", "verify", "repair", "gc"):
        keep_index_private(str(args.db))  # not volume, not up: nginx's workers read what those make
    if cmd == "volume":
        from minikv.volume.nginx import run_volume

        if len(args.positionals) != 1:
            raise UsageError("usage: minikv volume [-port 3001] DIR")
        port = args.port if "port" in args.given else int(os.environ.get("PORT", "3001"))
        return run_volume(port, args.positionals[0], host=args.host, secret=args.secret,
                          signed=args.signed > 0)
    if cmd == "server":
        _need(args, "volumes", "db")
        from minikv.server import run_server

        return run_server(args)
    if cmd == "copy-index":
        from minikv.admin.copy_index import main as copy_index
        from minikv.admin.trim import keep_trimmed

        keep_index_private("")  # an LMDB index it makes is for this user only
        keep_trimmed()  # it reads (or writes) every page of an LMDB index: 363 MB of RSS at 1M keys
        return copy_index(args)
    if cmd == "status":
        from minikv.ops.status import main as status

        return status(args)
    if cmd == "up":
        from minikv.cluster import run_cluster

        return run_cluster(args)
    if cmd in ("rebuild", "rebalance", "verify", "repair", "gc"):
        if not (cmd == "rebalance" and args.server):  # online: the running index knows both
            _need(args, "volumes", "db")
        import importlib

        from minikv.admin.trim import keep_trimmed

        keep_trimmed()  # the index pages a long walk reads would otherwise all count in its RSS
        module = importlib.import_module(f"minikv.admin.{cmd}")
        return module.main(args)
    if not cmd:
        raise UsageError("")
    raise UsageError(f"unknown command {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = parse_args(sys.argv[1:] if argv is None else argv)
            code = run(args)
        except UsageError as e:
            if str(e):
                print(f"minikv: {e}", file=sys.stderr)
                print("run `minikv -h` for the flags", file=sys.stderr)
                return 2
            print(usage())
            code = 0
        sys.stdout.flush()  # here, not at exit, so that a reader gone is caught below
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `minikv status | head`: the reader left, there is no one to tell
        # what is still buffered would fail again at exit: it goes nowhere instead
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
