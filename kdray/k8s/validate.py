"""Offline validation of KubeRay manifests (``RayJob``, ``RayCluster``, ``ray.io/v1``).

Two layers, because neither catches everything alone:

1. The CRD's own ``openAPIV3Schema`` (vendored in ``kdray/k8s/schemas/``, KubeRay v1.7.0), checked with
   ``jsonschema``. The API server *prunes* unknown fields instead of rejecting them, so a typo such as
   ``shutdownAfterJobFinish`` would be dropped silently and the cluster would live forever; here every
   object schema that lists ``properties`` and says nothing about ``additionalProperties`` is made
   closed, so the typo is an error.
2. The checks the KubeRay operator makes at reconcile time (``ray-operator/controllers/ray/utils/
   validation.go``), which no schema expresses: name length and DNS-1035 form, ``suspend`` needing
   ``shutdownAfterJobFinishes``, ``rayClusterSpec`` or ``clusterSelector``, positive deadlines,
   ``minReplicas <= maxReplicas``, a ``runtimeEnvYAML`` that parses, resources declared in only one place.

Both raise ``KdrayError`` naming the object and the JSON path (``spec.rayClusterSpec.workerGroupSpecs[0]``).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any, NoReturn

import jsonschema
import yaml

from kdray.core.errors import KdrayError

__all__ = ["validate_kuberay", "kuberay_schema", "MAX_RAYJOB_NAME", "MAX_RAYCLUSTER_NAME"]

API_VERSION = "ray.io/v1"
# KubeRay names the RayCluster of a RayJob "<rayjob>-<5 chars>" and its head Service
# "<raycluster>-head-svc"; both must stay within 63 characters, hence these limits (validation.go).
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
_SCHEMA_FILES = {"RayJob": "rayjob.v1.json", "RayCluster": "raycluster.v1.json"}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HINT = "KubeRay's ray.io/v1 CRDs (v1.7.0) are vendored in kdray/k8s/schemas/; compare the field with them."


def _closed(schema: Any) -> Any:
    """Return a copy of an OpenAPI v3 schema in which unknown keys are errors.

    Adds ``additionalProperties: false`` to every object schema with ``properties`` and no
    ``additionalProperties`` of its own, and turns ``nullable: true`` into an explicit ``null`` type
    (``jsonschema`` does not know the OpenAPI keyword).
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":  # keys here are field names, never keywords
            out[key] = {name: _closed(sub) for name, sub in value.items()}
        elif key in ("enum", "default", "required") or key.startswith("x-"):
            out[key] = value  # data, not sub-schemas
        else:
            out[key] = _closed(value)
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def kuberay_schema(kind: str) -> dict:
    """The vendored ``openAPIV3Schema`` of ``kind`` (``RayJob`` or ``RayCluster``), unmodified."""
    if kind not in _SCHEMA_FILES:
        raise KdrayError(f"no vendored schema for kind {kind!r}; known kinds: {sorted(_SCHEMA_FILES)}.")
    text = resources.files("kdray.k8s").joinpath("schemas", _SCHEMA_FILES[kind]).read_text("utf-8")
    return json.loads(text)


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_closed(kuberay_schema(kind)))


def _path(parts) -> str:
    """``["spec", "workerGroupSpecs", 0, "template"]`` -> ``spec.workerGroupSpecs[0].template``."""
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "<root>"


def _fail(doc: dict, where: str, message: str, hint: str | None = _HINT) -> NoReturn:
    kind = doc.get("kind", "?")
    name = (doc.get("metadata") or {}).get("name", "<unnamed>")
    raise KdrayError(message, where=f"{kind} {name!r} at {where}", hint=hint)


def _check_name(doc: dict, limit: int) -> None:
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        _fail(doc, "metadata.name", "is missing; KubeRay objects need a name.", hint=None)
    if len(name) > limit:
        _fail(
            doc,
            "metadata.name",
            f"{name!r} has {len(name)} characters; KubeRay allows at most {limit} "
            f"for a {doc['kind']} (it derives longer child names from it).",
            hint="Shorten it; kdray.k8s.render.rayjob_name() truncates and hashes long names for you.",
        )
    if not _DNS1035.match(name):
        _fail(
            doc,
            "metadata.name",
            f"{name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit).",
            hint=None,
        )


def _check_cluster_spec(doc: dict, spec: dict, where: str) -> None:
    """The reconcile-time checks on a RayClusterSpec (also embedded in a RayJob)."""
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for gpath, group in groups:
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            _fail(
                doc, f"{where}.{gpath}.template.spec.containers", "is empty; a Ray node needs its Ray container first."
            )
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            _fail(
                doc,
                f"{where}.{gpath}",
                "declares Ray resources both in rayStartParams and in resources; "
                "KubeRay rejects the group. Use one of the two.",
                hint=None,
            )
        if "labels" in params:
            _fail(
                doc,
                f"{where}.{gpath}.rayStartParams.labels",
                "is not supported; use the group's labels field.",
                hint=None,
            )
        if gpath.startswith("workerGroupSpecs"):
            lo, hi = group.get("minReplicas"), group.get("maxReplicas")
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                _fail(doc, f"{where}.{gpath}", f"minReplicas ({lo}) is greater than maxReplicas ({hi}).", hint=None)


def _check_rayjob(doc: dict) -> None:
    spec = doc.get("spec") or {}
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        _fail(
            doc,
            "spec.suspend",
            "is true but shutdownAfterJobFinishes is not; KubeRay only suspends RayJobs that delete their cluster.",
            hint="Set spec.shutdownAfterJobFinishes: true.",
        )
    if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        _fail(
            doc,
            "spec.ttlSecondsAfterFinished",
            "is set but shutdownAfterJobFinishes is not; the TTL only applies to clusters that are shut down.",
            hint="Set spec.shutdownAfterJobFinishes: true.",
        )
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        _fail(
            doc,
            "spec",
            "has neither rayClusterSpec nor clusterSelector; KubeRay needs one of them to know where the job runs.",
            hint=None,
        )
    if selector:
        if not selector.get("ray.io/cluster"):
            _fail(doc, "spec.clusterSelector", "must name the cluster under the key 'ray.io/cluster'.", hint=None)
        if spec.get("suspend"):
            _fail(doc, "spec.suspend", "cannot be used with clusterSelector.", hint=None)
        if (spec.get("backoffLimit") or 0) != 0:
            _fail(
                doc,
                "spec.backoffLimit",
                "must be 0 with clusterSelector (retries would reuse the same cluster).",
                hint=None,
            )
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and not (isinstance(spec[key], int) and spec[key] > 0):
            _fail(doc, f"spec.{key}", f"is {spec[key]!r}; it must be a positive number of seconds.", hint=None)
    for key in ("backoffLimit", "ttlSecondsAfterFinished"):
        if key in spec and isinstance(spec[key], int) and spec[key] < 0:
            _fail(doc, f"spec.{key}", f"is {spec[key]}; it must be 0 or more.", hint=None)
    if spec.get("runtimeEnvYAML"):
        try:
            parsed = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            _fail(doc, "spec.runtimeEnvYAML", f"does not parse as YAML: {exc}", hint=None)
        if parsed is not None and not isinstance(parsed, dict):
            _fail(doc, "spec.runtimeEnvYAML", f"parses to a {type(parsed).__name__}, not a mapping.", hint=None)
    if spec.get("rayClusterSpec"):
        _check_cluster_spec(doc, spec["rayClusterSpec"], "spec.rayClusterSpec")


def validate_kuberay(doc: dict) -> None:
    """Validate one ``ray.io/v1`` ``RayJob`` or ``RayCluster`` manifest as KubeRay would.

    Args:
        doc: the manifest as a dict (one YAML document).

    Raises:
        KdrayError: on the first problem, naming the object and the JSON path, e.g.
            ``RayJob 'x' at spec: Additional properties are not allowed ('shutdownAfterJobFinish' ...)``.
    """
    if not isinstance(doc, dict):
        raise KdrayError(f"a KubeRay manifest must be a mapping, got {type(doc).__name__}.")
    kind = doc.get("kind")
    if kind not in _SCHEMA_FILES or doc.get("apiVersion") != API_VERSION:
        raise KdrayError(
            f"expected apiVersion {API_VERSION} and kind RayJob or RayCluster, got "
            f"apiVersion {doc.get('apiVersion')!r} and kind {kind!r}."
        )
    # ``status`` is written by the operator; a manifest read back from the API may carry it.
    body = {k: v for k, v in doc.items() if k != "status"}
    errors = sorted(_validator(kind).iter_errors(body), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        err = errors[0]
        more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
        _fail(doc, _path(err.absolute_path), err.message + more)
    _check_name(doc, MAX_RAYJOB_NAME if kind == "RayJob" else MAX_RAYCLUSTER_NAME)
    if kind == "RayJob":
        _check_rayjob(doc)
    else:
        _check_cluster_spec(doc, doc.get("spec") or {}, "spec")
