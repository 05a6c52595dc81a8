"""One storage interface over ``pyarrow.fs``: a local folder (the default) or an S3-compatible bucket.

    store = Storage("file://./runs")            # or "s3://bucket/prefix"
    store.write_bytes("p/stage/key/manifest.json", data)

S3 endpoint and credentials come only from the environment: ``KDRAY_S3_ENDPOINT`` (e.g.
``http://127.0.0.1:8333``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``.
Writes are atomic: a local file is written beside its target and renamed; an S3 object appears
whole or not at all. That is what lets the manifest, written last, mark an artifact finished.
Buckets are never created here: a missing bucket is an error at ``check_writable``.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kdray.core.errors import StorageError

# The start-up probe (``check_writable``) waits little, so a wrong endpoint fails in seconds: a
# server that accepts connections and never answers costs attempts x request_timeout.
S3_PROBE_TIMEOUTS: dict[str, Any] = {"connect_timeout": 3.0, "request_timeout": 5.0, "attempts": 2}


def s3_endpoint() -> str | None:
    """The configured endpoint; one with credentials written into it (``user:pass@host``) is refused."""
    endpoint = os.environ.get("KDRAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "@" in urlparse(endpoint if "://" in endpoint else f"http://{endpoint}").netloc:
        raise StorageError(
            f"the S3 endpoint {redact(endpoint)!r} has credentials written into it",
            hint="Set only the address in KDRAY_S3_ENDPOINT (e.g. http://host:8333) and pass the keys as "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
        )
    return endpoint


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@`` (never echo credentials)."""
    return re.sub(r"(?<=://)[^/@\s]*@|^[^/@\s:]*:[^/@\s]*@", "***@", url)


def s3_filesystem(connect_timeout: float = 5.0, request_timeout: float = 20.0, attempts: int = 3) -> pafs.S3FileSystem:
    """An S3FileSystem configured from the environment (``AWS_ENDPOINT_URL`` is accepted too).

    The AWS SDK's request timeout is the longest silence on a connection, not the length of a
    transfer, so big uploads are unaffected; transient failures are retried ``attempts`` times.
    Inside a Ray Train worker whose environment names no S3 endpoint or keys, the run's own
    filesystem is used instead (see ``_ray_run_filesystem``).
    """
    endpoint = s3_endpoint()
    if not endpoint and not os.environ.get("AWS_ACCESS_KEY_ID"):
        inherited = _ray_run_filesystem()
        if inherited is not None:
            return inherited
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
        "connect_timeout": connect_timeout,
        "request_timeout": request_timeout,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "http")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        )
    return pafs.S3FileSystem(**kwargs)


def _ray_run_filesystem() -> pafs.S3FileSystem | None:
    """Inside a Ray Train worker: the S3 filesystem the driver passed as ``RunConfig.storage_filesystem``.

    Ray workers inherit the environment of the process that started Ray, not the driver's current
    one (a local Ray already running, cluster pods without the secret). The run's filesystem was
    built on the driver from its environment and reaches every worker pickled with its endpoint and
    keys, so workers read parents and data through it. (Sending the keys as ``runtime_env``
    variables instead would write them into Ray's logs, which record runtime environments.)
    """
    if "ray.train" not in sys.modules:  # not a Ray process: nothing to inherit, and no slow import
        return None
    try:
        import ray.train

        fs = ray.train.get_context().get_storage().storage_filesystem
    except Exception:  # not in a Train worker, local mode, or a Ray without this developer API
        return None
    return fs if isinstance(fs, pafs.S3FileSystem) else None


def _refused(err: OSError) -> bool:
    """Whether the server answered and denied the request (keys, signature, policy)."""
    return any(code in str(err) for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE"))


class Storage:
    """A root URI plus the pyarrow filesystem that serves it; paths below the root are relative."""

    def __init__(self, uri: str):
        self.root_uri = uri.rstrip("/")
        if uri.startswith("s3://"):
            self.scheme = "s3"
            self.fs: pafs.FileSystem = s3_filesystem()
            self.root = uri[len("s3://") :].strip("/")
            if not self.root:
                raise StorageError(f"storage URI {uri!r} names no bucket", hint="Use s3://<bucket>/<prefix>.")
        elif "://" in uri and not uri.startswith("file://"):
            raise StorageError(
                f"storage URI {redact(uri)!r} has scheme {uri.split('://', 1)[0]!r}; kdray reads file:// and s3:// only",
                hint="Use a local path, file:///path, or s3://bucket/prefix (download other URLs first).",
            )
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

    # ------------------------------------------------------------------ I/O

    def _wrap(self, action: str, rel: str, err: Exception) -> StorageError:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return StorageError(
                f"could not {action} {self.uri(rel)}: the disk is full (No space left on device)",
                hint=f"Free space on the disk that holds {self.root_uri} (or set storage.uri to a folder on another "
                "disk), then rerun: a stage resumes from its last checkpoint.",
                transient=True,  # space may come back; nothing half-written was left
            )
        return StorageError(
            f"could not {action} {self.uri(rel)}: {err}", hint=self._hint(), transient=self.scheme == "s3"
        )  # a network error may pass; a retry is cheap

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def _hint(self) -> str:
        if self.scheme == "s3":
            return (
                f"Check that the S3 server at {s3_endpoint() or 'AWS (KDRAY_S3_ENDPOINT unset)'} is "
                f"running and reachable, that bucket {self.bucket!r} exists, and that KDRAY_S3_ENDPOINT, "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set for it."
            )
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
            raise StorageError(
                f"{self.uri(rel)} does not exist", hint="Check the artifact URI (`kdray ls` lists finished artifacts)."
            ) from None
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
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, target)
                except BaseException:  # a full disk, an interrupt: leave no partial file behind
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            else:
                # One write() queues every part of a multipart upload; close() completes the upload
                # only if all parts arrived, so the object never exists partly written.
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
        return sorted(i.path[len(base) :] if i.path.startswith(base) else i.path for i in infos)

    def find(
        self, name: str, rel: str = "", max_depth: int = 8, max_entries: int = 200_000
    ) -> builtins.list[str]:  # (`list` is a method here)
        """Relative paths of the files called ``name`` under ``rel``, at most ``max_depth`` folders down.

        Local folders are walked without following links (no loops) and the walk stops after
        ``max_entries`` entries, so pointing it at a system folder ends quickly.
        """
        if self.scheme != "file":
            return [p for p in self.list(rel, recursive=True) if p == name or p.endswith(f"/{name}")]
        top, seen = self.path(rel), 0
        found: builtins.list[str] = []
        for folder, dirs, files in os.walk(top, followlinks=False):
            depth = os.path.relpath(folder, top).count(os.sep) + (folder != top)
            seen += len(dirs) + len(files)
            if depth >= max_depth:
                dirs.clear()
            if name in files and not os.path.islink(os.path.join(folder, name)):
                found.append(os.path.relpath(os.path.join(folder, name), self.root))
            if seen > max_entries:
                break
            dirs.sort()
        return sorted(found)

    def stamps(self, rels: builtins.list[str]) -> dict[str, str]:
        """How each file looks now, cheaply (no content read): ``etag:<ETag>`` of an S3 object,
        ``<size>:<mtime_ns>`` of a local file; ``missing`` when it does not exist."""
        if self.scheme == "s3":
            return self._etags(rels)
        try:
            infos = self.fs.get_file_info([self.path(r) for r in rels])
        except OSError as e:
            raise self._wrap("reach", rels[0] if rels else "", e) from None
        return {
            r: "missing" if i.type == pafs.FileType.NotFound else f"{i.size}:{i.mtime_ns}" for r, i in zip(rels, infos)
        }

    def _etags(self, rels: builtins.list[str]) -> dict[str, str]:
        """ETags of S3 objects (pyarrow's FileInfo has none), listed by boto3 with bounded requests."""
        import boto3.session
        import botocore.config
        import botocore.exceptions

        config = botocore.config.Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3})
        # a fresh session: the default one caches the credentials it resolved first, whatever the environment says now
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=s3_endpoint(),
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
            region_name=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
            config=config,
        )
        bucket, _, prefix = self.path().partition("/")
        found: dict[str, str] = {}
        try:  # one listing (1,000 objects a page) rather than a request per object
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
            ):
                for obj in page.get("Contents", []):
                    found[obj["Key"]] = "etag:" + obj["ETag"].strip('"')
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise self._wrap("list", "", OSError(str(e))) from None
        return {rel: found.get(self.path(rel).partition("/")[2], "missing") for rel in rels}

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)
            self.fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def check_writable(self) -> None:
        """Fail fast (exit 2, no hang) when the root cannot be written: a missing bucket, a bad endpoint.

        On S3 the bucket must already exist: kdray never creates one (some servers create buckets
        on a first upload, which would hide a typo in ``storage.uri``).
        """
        probe = f".kdray-probe-{uuid.uuid4().hex[:8]}"
        if self.scheme == "file":
            self.write_bytes(probe, b"ok")
            self._delete_quietly(self.fs, probe)
            return
        fs = s3_filesystem(**S3_PROBE_TIMEOUTS)
        where = f"S3 endpoint {s3_endpoint() or 'AWS (KDRAY_S3_ENDPOINT unset)'}"
        try:
            bucket = fs.get_file_info(self.bucket)
        except OSError as e:
            if not _refused(e):
                raise StorageError(
                    f"cannot use storage {self.root_uri}: a request for bucket {self.bucket!r} to "
                    f"the {where} failed ({e})",
                    hint=self._hint(),
                ) from None
            bucket = None  # a policy may allow objects under the prefix but not HeadBucket: the write decides
        if bucket is not None and bucket.type == pafs.FileType.NotFound:
            raise StorageError(
                f"storage {self.root_uri}: bucket {self.bucket!r} does not exist on the {where}",
                hint="Create it first (kdray never creates buckets), e.g. "
                f"`aws s3 mb s3://{self.bucket}`, or set storage.uri to an existing bucket.",
            )
        try:
            with fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
        except OSError as e:
            hint = (
                "The server refused the request: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that "
                f"they may write under {self.root_uri}."
                if _refused(e)
                else self._hint()
            )
            raise StorageError(f"cannot write to storage {self.root_uri} on the {where} ({e})", hint=hint) from None
        self._delete_quietly(fs, probe)

    def _delete_quietly(self, fs: pafs.FileSystem, rel: str) -> None:
        try:
            fs.delete_file(self.path(rel))
        except OSError:
            pass
