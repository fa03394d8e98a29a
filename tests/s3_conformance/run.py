"""Run the S3 conformance suite (Ceph's s3-tests) against a real minikv cluster.

The suite is not part of this repository: it is read from `../shared/s3-tests` beside the repo
root (or `$MINIKV_S3_TESTS`), never modified (pytest runs it with its cache off and writes its
report elsewhere). This module starts a cluster on free loopback ports with one credential pair
(the suite's three users all get it: minikv has one), writes the suite's config, and runs the
tests named in `selection.txt` in one pytest process.

    .venv/bin/python tests/s3_conformance/run.py [--all] [extra pytest args, e.g. --tb=short]

(`--all`: every test of the suite, selected or not, to revise the selection: about 15 minutes.
`--postgres`: the cluster's index in a throwaway PostgreSQL (tests/pg.py) instead of LMDB.)

`selection.txt` lists every test of the suite's functional files: selected ones by name, the
rest under a reason. tests/test_s3_conformance.py runs this in the test suite (`./dev test`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SELECTION = HERE / "selection.txt"
FILES = ("s3tests/functional/test_s3.py", "s3tests/functional/test_headers.py")
ACCESS_KEY = "minikvconformance"
SECRET_KEY = "conformance-secret-key-not-a-real-one"
TIMEOUT = 600  # seconds for the selection: a hung test must not hold CI to its limit


def suite_dir() -> Path | None:
    """The suite's folder, or None when this machine has none."""
    given = os.environ.get("MINIKV_S3_TESTS")
    path = Path(given) if given else REPO.parent / "shared" / "s3-tests"
    return path if (path / "s3tests" / "functional" / "test_s3.py").is_file() else None


@dataclass
class Selection:
    selected: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # test -> reason


def read_selection(path: Path = SELECTION) -> Selection:
    """`selection.txt`: a test name per line. `[select]` starts the selected tests; a line
    `[out: REASON]` starts tests left out for that reason. `#` starts a comment."""
    sel = Selection()
    reason: str | None = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line == "[select]":
            reason = None
        elif line.startswith("[out:") and line.endswith("]"):
            reason = line[5:-1].strip()
            if not reason:
                raise ValueError(f"{path.name}:{n}: a section of tests left out must say why")
        elif not re.fullmatch(r"test_\w+", line):
            raise ValueError(f"{path.name}:{n}: not a test name: {line!r}")
        elif line in sel.left_out or line in sel.selected:
            raise ValueError(f"{path.name}:{n}: {line} is listed twice")
        elif reason is None:
            sel.selected.append(line)
        else:
            sel.left_out[line] = reason
    return sel


def suite_tests(suite: Path) -> dict[str, tuple[str, set[str]]]:
    """Every test function of the suite's files: name -> (file, its pytest marks), read from the
    source (the marks decide which failures AWS itself shows)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for rel in FILES:
        marks: set[str] = set()
        for line in (suite / rel).read_text().splitlines():
            if m := re.match(r"@pytest\.mark\.(\w+)", line):
                marks.add(m.group(1))
            elif m := re.match(r"def (test_\w+)\(", line):
                out[m.group(1)] = (rel, marks)
                marks = set()
            elif line and not line.startswith(("@", " ", "#")):
                marks = set()
    return out


def write_config(path: Path, port: int) -> None:
    # minikv has one user, named "minikv" in listings' Owner: every user of the suite is that one
    users = "".join(
        f"[{section}]\ndisplay_name = minikv\nuser_id = minikv\nemail = {name}@example.com\n"
        f"access_key = {ACCESS_KEY}\nsecret_key = {SECRET_KEY}\n{extra}\n"
        for section, name, extra in [("s3 main", "main", "api_name = \n"), ("s3 alt", "alt", ""),
                                     ("s3 tenant", "tenant", "tenant = testx\n"), ("iam", "iam", ""),
                                     ("iam root", "root", ""), ("iam alt root", "altroot", "")])
    path.write_text(f"[DEFAULT]\nhost = 127.0.0.1\nport = {port}\nis_secure = False\nssl_verify = False\n\n"
                    f"[fixtures]\nbucket prefix = conf-{{random}}-\n\n{users}")


@dataclass
class Result:
    outcomes: dict[str, str]  # test -> passed | failed | error | skipped
    aws_fails: set[str]  # selected tests the suite marks fails_on_aws
    output: str

    def passed(self) -> list[str]:
        return [t for t, o in self.outcomes.items() if o == "passed"]

    def broken(self) -> list[str]:
        """Selected tests that did not pass, AWS's own failures aside."""
        return [t for t, o in self.outcomes.items() if o != "passed" and t not in self.aws_fails]


def _outcomes(report: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        kinds = {child.tag for child in case}
        outcome = "passed"
        for tag in ("error", "failure", "skipped"):
            if tag in kinds:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
                break
        # an error in teardown after a pass is a second entry for the same test: the worst wins
        if out.get(name, "passed") == "passed":
            out[name] = outcome
    return out


def run(suite: Path, work: Path, names: list[str] | None = None, extra: list[str] = (),
        db: str | None = None) -> Result:
    """Start a cluster in `work` (its index at `db`: None for LMDB), run the selected tests (or
    `names`) against it, stop it."""
    sys.path.insert(0, str(HERE.parent))
    from cluster import Cluster

    tests = suite_tests(suite)
    names = names if names is not None else read_selection().selected
    unknown = [n for n in names if n not in tests]
    if unknown:
        raise ValueError(f"not tests of the suite: {unknown[:5]}")
    work.mkdir(parents=True, exist_ok=True)
    secret = work / "secret"
    secret.write_text(SECRET_KEY + "\n")
    secret.chmod(0o600)
    cluster = Cluster(work / "cluster", flags=["-s3-access-key", ACCESS_KEY, "-s3-secret-key-file", str(secret)],
                      db=db)
    conf = work / "s3tests.conf"
    report = work / "report.xml"
    try:
        cluster.start()
        write_config(conf, cluster.port)
        env = {**os.environ, "S3TEST_CONF": str(conf), "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
               "PYTHONDONTWRITEBYTECODE": "1"}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(var, None)
        # one pytest process for the whole selection: the suite's own pytest.ini, no cache (the
        # suite's folder may be read-only), the report in our folder
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(suite / "pytest.ini"),
               "--rootdir", str(suite), f"--junitxml={report}", "-o", "junit_family=xunit1",
               "--tb=line", "-W", "ignore", *extra, *(f"{tests[n][0]}::{n}" for n in names)]
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=suite, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=max(TIMEOUT, 3 * len(names)))
        output = proc.stdout + f"\n({time.monotonic() - started:.0f} s)\n"
    finally:
        cluster.stop()
    if not report.exists():
        raise RuntimeError(f"the suite wrote no report:\n{output[-3000:]}")
    outcomes = _outcomes(report)
    return Result(outcomes, {n for n in outcomes if "fails_on_aws" in tests.get(n, ("", set()))[1]}, output)


def main(argv: list[str]) -> int:
    suite = suite_dir()
    if suite is None:
        print("s3 conformance: skipped, no ../shared/s3-tests beside the repository (set MINIKV_S3_TESTS)")
        return 0
    from cluster import open_dir

    names = None
    if argv[:1] == ["--all"]:  # every test of the suite, selected or not: to revise the selection
        names, argv = sorted(suite_tests(suite)), argv[1:]
    postgres = None
    if "--postgres" in argv:
        from pg import Postgres

        argv = [a for a in argv if a != "--postgres"]
        postgres = Postgres().init().start()
    work = open_dir()
    try:
        result = run(suite, work, names, argv, db=postgres and postgres.create_db("conformance"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if postgres is not None:
            postgres.remove()
    print(result.output if "-v" in argv or "--tb=short" in argv else result.output[-4000:])
    for name, outcome in sorted(result.outcomes.items()):
        if outcome != "passed":
            print(f"{outcome:8} {name}{' (fails on AWS too)' if name in result.aws_fails else ''}")
    print(f"s3 conformance: {len(result.passed())} of {len(result.outcomes)} passed, "
          f"{len(result.broken())} broken")
    return 1 if result.broken() else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main(sys.argv[1:]))
