"""What can be checked before a run: every file a spec names exists, and S3 has credentials.

``kdray validate`` and ``kdray run`` call ``preflight(spec)`` after the spec validates, so that a
``data.path`` or ``model.weights`` that does not exist, or an ``s3://`` URI for which the standard
credential chain finds nothing, is one paragraph naming the stage and field before any stage starts
(rather than a failure minutes later, or a DNS error for missing keys). Nothing here writes; the only
network wait is the credential chain's own (its instance-metadata look-up is bounded to one second).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse

from pydantic import BaseModel

from kdray.core.errors import SpecError
from kdray.engine.spec import PipelineSpec


def _fields(model: BaseModel, prefix: str) -> Iterator[tuple[str, str, BaseModel]]:
    """(field path, field name, owner) for every file-naming field below ``model``: ``data.path``-like
    ``path`` fields of data specs and ``weights`` of model specs, however deep (``source_domain.path``)."""
    for name, value in model:
        here = f"{prefix}.{name}"
        if isinstance(value, BaseModel):
            yield from _fields(value, here)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _fields(item, f"{here}[{i}]")
        elif isinstance(value, str) and value and name in ("path", "weights"):
            yield here, name, model


def _s3_credentials() -> bool:
    """Whether the standard AWS credential chain finds keys (environment, shared files, web identity,
    instance role), as boto3 resolves it."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return True
    os.environ.setdefault("AWS_METADATA_SERVICE_TIMEOUT", "1")  # bound the instance-role look-up
    os.environ.setdefault("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    try:
        import boto3

        return boto3.Session().get_credentials() is not None
    except Exception:  # a broken shared config file: the run will say what is wrong with it
        return True


def _no_credentials(field: str, uri: str) -> SpecError:
    return SpecError(
        f"{field}: {uri} is in S3, but no S3 credentials were found (AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY in the environment, a shared credentials file, web identity or an instance role)",
        hint="Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and KDRAY_S3_ENDPOINT for a server other "
        "than AWS) in the environment; credentials never go in the spec.",
    )


def preflight(spec: PipelineSpec, source: str = "") -> None:
    """Raise a ``SpecError`` naming the file and field of the first input that cannot exist."""
    where = f"{source}: " if source else ""
    s3_fields: list[tuple[str, str]] = []
    if spec.storage.uri.startswith("s3://"):
        s3_fields.append(("storage.uri", spec.storage.uri))
    for stage in spec.stages:
        for field, name, owner in _fields(stage, f"stages.{stage.name}"):
            value = getattr(owner, name)
            scheme = urlparse(value).scheme if "://" in value else ""
            if scheme == "s3":
                s3_fields.append((field, value))
                continue
            if scheme not in ("", "file"):
                continue  # an artifact URI of another kind, or a registry name: checked where it is read
            path = value[len("file://") :] if scheme == "file" else value
            if not os.path.exists(path):
                what = "folder or file" if name == "path" else "weights file"
                raise SpecError(
                    f"{where}{field}: no {what} at {value} (looked for {os.path.abspath(path)})",
                    hint="Fix the path (a relative path in a spec is taken from the spec file's folder, one in an "
                    "override from the shell's), "
                    + ("or import the data there first (kdray data import)." if name == "path" else "or remove it."),
                )
    if s3_fields and not _s3_credentials():
        field, uri = s3_fields[0]
        raise _no_credentials(f"{where}{field}", uri)
