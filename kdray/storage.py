"""One storage interface over ``pyarrow.fs``: a local folder (the default) or an S3-compatible bucket.

    store = Storage("file://./runs")            # or "s3://bucket/prefix"
    store.write_bytes("p/stage/key/manifest.json", data)
    store.ray_storage()                          # (storage_path, filesystem) for Ray's RunConfig

S3 endpoint and credentials come only from the environment: ``KDRAY_S3_ENDPOINT`` (e.g.
``http://127.0.0.1:8333``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.
Writes are atomic: a local file is written beside its target and renamed; an S3 object appears
whole or not at all. That is what lets the manifest, written last, mark an artifact finished.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdray.errors import StorageError


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem configured from the environment (pyarrow ignores AWS_ENDPOINT_URL on its own)."""
    endpoint = os.environ.get("KDRAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
                    "connect_timeout": 5.0, "request_timeout": 30.0,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    return pafs.S3FileSystem(**kwargs)


class Storage:
    """A root URI plus the pyarrow filesystem that serves it; paths below the root are relative."""

    def __init__(self, uri: str):
        self.root_uri = uri.rstrip("/")
        if uri.startswith("s3://"):
            self.scheme = "s3"
            self.fs: pafs.FileSystem = s3_filesystem()
            self.root = uri[len("s3://"):].strip("/")
            if not self.root:
                raise StorageError(f"storage URI {uri!r} names no bucket", hint="Use s3://<bucket>/<prefix>.")
        else:
            self.scheme = "file"
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(uri.removeprefix("file://")).expanduser().resolve())
            self.root_uri = f"file://{self.root}"

    # ------------------------------------------------------------------ paths

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what pyarrow calls take)."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str = "") -> str:
        rel = rel.strip("/")
        return f"{self.root_uri}/{rel}" if rel else self.root_uri

    def child(self, rel: str) -> "Storage":
        return Storage(self.uri(rel))

    def ray_storage(self) -> tuple[str, pafs.FileSystem]:
        """(storage_path, storage_filesystem) for ``ray.train.RunConfig``."""
        return self.path("_ray"), self.fs

    # ------------------------------------------------------------------ I/O

    def _wrap(self, action: str, rel: str, err: Exception) -> StorageError:
        return StorageError(f"could not {action} {self.uri(rel)}: {err}",
                            hint=self._hint())

    def _hint(self) -> str:
        if self.scheme == "s3":
            return ("Check that the bucket exists and that KDRAY_S3_ENDPOINT, AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY are set for this S3-compatible server.")
        return "Check that the folder exists and is writable, or set storage.uri to another folder."

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except OSError as e:
            raise self._wrap("reach", rel, e) from None

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri(rel)} does not exist",
                               hint="Check the artifact URI (`kdray ls` lists finished artifacts).") from None
        except OSError as e:
            raise self._wrap("read", rel, e) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing or the whole file."""
        target = self.path(rel)
        try:
            if self.scheme == "file":
                parent = os.path.dirname(target)
                os.makedirs(parent, exist_ok=True)
                tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        except OSError as e:
            raise self._wrap("write", rel, e) from None

    def upload_file(self, local: str | Path, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def download(self, rel: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.read_bytes(rel))
        return local

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Relative paths of the entries under ``rel`` (files and folders)."""
        try:
            selector = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
            infos = self.fs.get_file_info(selector)
        except OSError as e:
            raise self._wrap("list", rel, e) from None
        base = self.root + "/"
        return sorted(i.path[len(base):] if i.path.startswith(base) else i.path for i in infos)

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)
            self.fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def check_writable(self) -> None:
        """Fail fast (exit 2, no hang) when the root cannot be written: a missing bucket, a bad endpoint."""
        probe = f".kdray-probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"ok")
        try:
            self.fs.delete_file(self.path(probe))
        except OSError:
            pass

