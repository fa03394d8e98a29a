"""A throwaway PostgreSQL for the tests: initdb + pg_ctl into a temporary folder, listening on
a loopback port, as an unprivileged user when the tests run as root (PostgreSQL refuses root).

Password authentication is on (scram-sha-256), so a wrong password is a real refusal."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from cluster import HOST, free_port

from minikv.pg_local import bin_dir, unprivileged_user

USER = "minikv"
PASSWORD = "test-password"  # a throwaway instance's, on loopback only


class Postgres:
    def __init__(self):
        self.bin = bin_dir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: `./dev test` installs it (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="minikv-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if (user := unprivileged_user()) is not None:
            self.as_user = ["runuser", "-u", user, "--"]
            uid = pwd.getpwnam(user)
            os.chown(self.root, uid.pw_uid, uid.pw_gid)
        self.root.chmod(0o700)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, check=check, timeout=60)

    def init(self) -> Postgres:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, self.as_user[2])
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C")
        pwfile.unlink()
        return self

    def start(self) -> Postgres:
        opts = f"-c listen_addresses={HOST} -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
                  "-w", "-t", "30", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop",
                  check=False)

    def url(self, db: str = USER, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@{HOST}:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """A new empty database on this instance; its URL."""
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def generic_plan_scans(self, statement: str, types: str) -> list[str]:
        """The scans of minikv_keys in the plan PostgreSQL keeps for a prepared `statement` (its
        parameters' `types`) after its first uses, made on a new index whose table is empty."""
        name = "p" + uuid.uuid4().hex[:12]
        self.create_db(name)
        from minikv.index.pg import connect, create_schema

        async def explain() -> str:
            conn = await connect(self.url(name))
            try:
                await create_schema(conn)
                await conn.execute("SET plan_cache_mode = force_generic_plan")  # the plan kept after 5 uses
                await conn.execute(f"PREPARE s({types}) AS {statement}")
                nulls = ", ".join("NULL" for _ in types.split(","))
                return await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE s({nulls})")
            finally:
                await conn.close()

        def nodes(node: dict):
            yield node
            for child in node.get("Plans", []):
                yield from nodes(child)

        plan = json.loads(asyncio.run(explain()))[0]["Plan"]
        return [n["Node Type"] for n in nodes(plan)
                if n.get("Relation Name") == "minikv_keys" and n["Node Type"] != "ModifyTable"]

    def psql(self, db: str, sql: str) -> str:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        out = subprocess.run([str(self.bin / "psql"), "-h", HOST, "-p", str(self.port), "-U", USER, "-d", db,
                              "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True, env=env, timeout=30, check=True)
        return out.stdout

    def remove(self) -> None:
        self.stop("immediate")
        for _ in range(50):
            if not (self.data / "postmaster.pid").exists():
                break
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
