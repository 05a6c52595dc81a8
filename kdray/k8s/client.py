"""Create, watch and clean up KubeRay RayJobs through the Kubernetes API.

The ``kuberay`` launcher's client. ``submit`` renders the stage's RayJob (``kdray.k8s.render_rayjob``),
validates it offline (``kdray.k8s.validate``) and creates it; the name is deterministic
(pipeline, stage, stage key), so a retried Prefect task finds the RayJob of the earlier attempt and
reuses it instead of starting a second cluster. ``wait`` polls ``status.jobDeploymentStatus``, which
KubeRay moves through ``Initializing -> Running -> Complete | Failed`` (``ValidationFailed`` when the
operator rejects the spec); ``status.reason`` says why a job failed (``AppFailed``, ``DeadlineExceeded``,
``SubmissionFailed``, ...). ``logs`` reads the submitter pod: in ``K8sJobMode`` KubeRay runs
``ray job submit`` in a Kubernetes Job named like the RayJob, and that pod follows the Ray job's
output, so its log is the job's log.

RBAC needed (``k8s/base/rbac.yaml``, ServiceAccount ``kdray-runner``): ``ray.io`` ``rayjobs``
create/get/list/watch/delete, ``rayjobs/status`` get, ``pods`` get/list, ``pods/log`` get.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from kdray.core.errors import KdrayError
from kdray.k8s.render import ANNOTATION_KEY, JobRequest, render_rayjob
from kdray.k8s.validate import validate_kuberay

__all__ = ["KubeRayClient", "JobFailed", "JobTimeout", "TERMINAL_DEPLOYMENT_STATUSES"]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})
_FAILED = frozenset({"Failed", "ValidationFailed"})
_MAX_API_ERRORS = 5  # consecutive transient errors tolerated while polling


class JobFailed(KdrayError):
    """A RayJob ended without success; ``status`` holds KubeRay's jobStatus/jobDeploymentStatus/reason/message."""

    def __init__(self, name: str, status: dict):
        self.name, self.status = name, status
        reason = status.get("reason") or status.get("jobDeploymentStatus") or "unknown"
        detail = status.get("message") or "no message from KubeRay"
        super().__init__(
            f"ended with jobDeploymentStatus={status.get('jobDeploymentStatus')!r}, "
            f"jobStatus={status.get('jobStatus')!r}, reason {reason}: {detail}",
            where=f"RayJob {name!r}",
            hint=_FAILURE_HINTS.get(
                reason, f"Read the job log with KubeRayClient.logs(name) or `kubectl logs -l job-name={name}`."
            ),
        )


class JobTimeout(KdrayError):
    """``wait`` gave up before the RayJob reached a terminal status (the RayJob keeps running)."""


_FAILURE_HINTS = {
    "AppFailed": "The stage itself failed; its traceback is in the job log (KubeRayClient.logs).",
    "DeadlineExceeded": "The job ran past activeDeadlineSeconds; raise JobRequest.active_deadline_s "
    "or give the stage more workers.",
    "ValidationFailed": "The KubeRay operator rejected the spec; `kubectl describe rayjob` shows its event.",
    "SubmissionFailed": "The submitter Job could not reach the Ray head; check the head pod "
    "(`kubectl get pods -l ray.io/node-type=head`).",
}


def _default_api_client():
    """An ``ApiClient`` from the in-cluster service account, else from ``$KUBECONFIG``/``~/.kube/config``."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            # Read KUBECONFIG now: the client's own default was frozen when it was imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
        except Exception as exc:  # a missing, unreadable or garbage kubeconfig (YAML, types, keys) alike
            raise KdrayError(
                f"no Kubernetes credentials found ({type(exc).__name__}: {str(exc)[:300]}).",
                where="kuberay launcher",
                hint="Run inside the cluster with the kdray-runner ServiceAccount, or point KUBECONFIG at "
                "a kubeconfig whose user may create ray.io RayJobs.",
            ) from exc
    return client.ApiClient(cfg)


# Every API request is bounded: (connect, read) seconds. A server that accepts connections and never
# answers fails after REQUEST_TIMEOUT_S[1] seconds with the limit in the error, instead of hanging.
REQUEST_TIMEOUT_S = (5.0, 30.0)


class _Bounded:
    """A Kubernetes API object whose every call has a request timeout, and whose transport failures
    (refused connection, timeout, reset) are KdrayErrors naming the server and the limit."""

    def __init__(self, api: Any, host: str, timeout: tuple[float, float]):
        self._api, self._host, self._timeout = api, host, timeout

    def __getattr__(self, name: str) -> Any:
        import urllib3

        fn = getattr(self._api, name)
        if not callable(fn):
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("_request_timeout", self._timeout)
            try:
                return fn(*args, **kwargs)
            except urllib3.exceptions.HTTPError as exc:
                raise KdrayError(
                    f"the Kubernetes API server at {self._host} did not answer ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); each request may take {self._timeout[0]:g} s to connect and "
                    f"{self._timeout[1]:g} s to answer",
                    where="kuberay launcher",
                    hint="Check that the API server is up and that KUBECONFIG (or the in-cluster service "
                    "account) points at it.",
                ) from exc

        return call


class KubeRayClient:
    """RayJob lifecycle over the Kubernetes API (``CustomObjectsApi`` + ``CoreV1Api``).

    Args:
        api_client: a ``kubernetes.client.ApiClient``; by default one from the in-cluster
            configuration or the local kubeconfig.
        namespace: namespace of every RayJob this client touches.
    """

    DELETE_POLL_S = 0.5  # how often submit() checks that a replaced RayJob is gone

    def __init__(self, api_client=None, namespace: str = "kdray"):
        from kubernetes import client

        self.api_client = api_client if api_client is not None else _default_api_client()
        self.namespace = namespace
        host = getattr(getattr(self.api_client, "configuration", None), "host", "?")
        self.custom = _Bounded(client.CustomObjectsApi(self.api_client), host, REQUEST_TIMEOUT_S)
        self.core = _Bounded(client.CoreV1Api(self.api_client), host, REQUEST_TIMEOUT_S)

    # -- API helpers ---------------------------------------------------------------------------
    def _api_error(self, exc, action: str, name: str | None) -> KdrayError:
        """Turn a Kubernetes ``ApiException`` into a KdrayError saying what to fix."""
        status = getattr(exc, "status", None)
        where = f"RayJob {name!r} in namespace {self.namespace!r}" if name else f"namespace {self.namespace!r}"
        hints = {
            401: "The Kubernetes credentials were rejected; refresh the kubeconfig or the service account token.",
            403: f"The service account may not {action} ray.io rayjobs here; apply k8s/base (Role kdray-runner) "
            "and run as ServiceAccount kdray-runner.",
            404: "The ray.io/v1 RayJob API is missing (install the KubeRay operator, chart kuberay-operator "
            "1.7.0) or the RayJob was deleted.",
            422: "The API server rejected the manifest; its message names the field.",
        }
        detail = ""
        try:  # the API's Status object says which rule or field failed
            detail = json.loads(getattr(exc, "body", None) or "{}").get("message", "")
        except (TypeError, ValueError, AttributeError):
            pass
        text = f"could not {action}: HTTP {status} {getattr(exc, 'reason', '') or ''}".rstrip()
        return KdrayError(
            text + (f" ({detail})." if detail else "."),
            where=where,
            hint=hints.get(status or 0, "Check the API server and retry."),
        )

    def _get(self, name: str) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)  # type: ignore[return-value]
        except ApiException as exc:
            raise self._api_error(exc, "read", name) from exc

    # -- public API ----------------------------------------------------------------------------
    def submit(self, req: JobRequest, *, replace_failed: bool = True, delete_timeout_s: float = 120.0) -> str:
        """Create the stage's RayJob, or reuse the one that already has its name; return the name.

        Idempotent: a RayJob with the same name and the same stage key (annotation ``kdray.io/key``)
        is reused as it is, running or finished. With ``replace_failed`` (the default) an existing
        RayJob that *failed* is deleted and created again, so a retried task gets a fresh attempt
        (Ray Train resumes from the stage's last checkpoint because the run name is deterministic).

        Raises:
            KdrayError: the request's namespace is not this client's, the manifest does not validate,
                a RayJob with this name belongs to a different stage key, or the API refused.
        """
        from kubernetes.client.rest import ApiException

        if req.namespace != self.namespace:
            raise KdrayError(
                f"the request is for namespace {req.namespace!r} but this client works in {self.namespace!r}.",
                where="JobRequest.namespace",
                hint="Build KubeRayClient(namespace=...) with the request's namespace.",
            )
        body = render_rayjob(req)
        validate_kuberay(body)
        name = body["metadata"]["name"]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            return name
        except ApiException as exc:
            if exc.status != 409:
                raise self._api_error(exc, "create", name) from exc
        existing = self._get(name)
        their_key = (existing.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_KEY)
        if their_key != req.key:
            raise KdrayError(
                f"already exists for stage key {their_key!r}, not {req.key!r}.",
                where=f"RayJob {name!r}",
                hint=f"Delete it (`kubectl delete rayjob -n {self.namespace} {name}`) if it is stale.",
            )
        if replace_failed and self._summary(existing)["jobDeploymentStatus"] in _FAILED:
            self.delete(name)
            self._wait_gone(name, delete_timeout_s)
            try:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            except ApiException as exc:
                raise self._api_error(exc, "create", name) from exc
        return name

    @staticmethod
    def _summary(obj: dict) -> dict:
        st = obj.get("status") or {}
        return {
            "name": obj.get("metadata", {}).get("name", ""),
            "jobStatus": st.get("jobStatus", ""),
            "jobDeploymentStatus": st.get("jobDeploymentStatus", ""),
            "reason": st.get("reason", ""),
            "message": st.get("message", ""),
        }

    def status(self, name: str) -> dict:
        """``{"name", "jobStatus", "jobDeploymentStatus", "reason", "message"}``; ``""`` for unset fields."""
        return self._summary(self._get(name))

    def wait(
        self,
        name: str,
        *,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        on_status: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll until the RayJob is terminal; return its final status if the job succeeded.

        ``on_status`` is called with each status that differs from the previous one (for logging
        progress). Up to 5 consecutive transient API errors (5xx, connection resets) are retried.

        Raises:
            JobFailed: jobDeploymentStatus is Failed or ValidationFailed, or Complete without
                jobStatus SUCCEEDED (a stopped job).
            JobTimeout: ``timeout_s`` passed first (the RayJob is left running).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last, errors = None, 0
        while True:
            current, error = self._poll(name)
            if error is None:
                errors = 0
            else:
                errors += 1
                if errors >= _MAX_API_ERRORS:
                    raise KdrayError(
                        f"the Kubernetes API failed {errors} times in a row while polling: {error}",
                        where=f"RayJob {name!r}",
                        hint="Check the API server; the RayJob itself keeps running.",
                    ) from error
                current = last
            if current is not None and current != last:
                last = current
                if on_status is not None:
                    on_status(dict(current))
            if current is not None and current["jobDeploymentStatus"] in TERMINAL_DEPLOYMENT_STATUSES:
                if current["jobDeploymentStatus"] == "Complete" and current["jobStatus"] == "SUCCEEDED":
                    return current
                raise JobFailed(name, current)
            if deadline is not None and time.monotonic() >= deadline:
                state = current or {}
                raise JobTimeout(
                    f"still jobDeploymentStatus={state.get('jobDeploymentStatus')!r} "
                    f"(jobStatus={state.get('jobStatus')!r}) after {timeout_s} s.",
                    where=f"RayJob {name!r}",
                    hint="Call wait() again to keep waiting, or delete() to stop it.",
                )
            time.sleep(poll_s)

    def _poll(self, name: str) -> tuple[dict | None, Exception | None]:
        """One status read for ``wait``: ``(status, None)``, or ``(None, error)`` for a transient error."""
        import urllib3
        from kubernetes.client.rest import ApiException

        try:
            return self.status(name), None
        except KdrayError as exc:
            cause = exc.__cause__
            if isinstance(cause, ApiException) and cause.status in (429, 500, 502, 503, 504):
                return None, cause
            if isinstance(cause, urllib3.exceptions.HTTPError):  # refused, reset, timed out: transient
                return None, cause
            raise
        except urllib3.exceptions.HTTPError as exc:  # connection refused or reset, read timeout
            return None, exc

    def logs(self, name: str) -> str:
        """The log of the RayJob's submitter pod (label ``job-name=<name>``), newest pod first.

        Raises:
            KdrayError: no submitter pod exists yet (the job is still Initializing) or it is gone.
        """
        from kubernetes.client.rest import ApiException

        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}").items
        except ApiException as exc:
            raise self._api_error(exc, "list the submitter pods of", name) from exc
        if not pods:
            raise KdrayError(
                "has no submitter pod (yet): KubeRay creates it once the Ray cluster is ready, "
                "and removes it when the RayJob is deleted.",
                where=f"RayJob {name!r}",
                hint="Check the state with status(name); logs exist from jobDeploymentStatus Running.",
            )

        # A retried submitter Job leaves one pod per attempt; the newest one has the live log.
        def age(pod: Any) -> tuple[float, str]:
            created = pod.metadata.creation_timestamp
            return (created.timestamp() if created else 0.0, pod.metadata.name)

        newest: Any = max(pods, key=age)
        try:
            # Raw bytes: older kubernetes clients json-decode a log that happens to be one JSON
            # document (returning its Python repr), and every client rejects unknown content types.
            response: Any = self.core.read_namespaced_pod_log(
                newest.metadata.name, self.namespace, _preload_content=False
            )
            return response.data.decode("utf-8", errors="replace")
        except ApiException as exc:
            raise self._api_error(exc, f"read the log of pod {newest.metadata.name!r} of", name) from exc  # type: ignore[union-attr]

    def delete(self, name: str) -> None:
        """Delete the RayJob (KubeRay then deletes its cluster and submitter Job). Missing is fine."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise self._api_error(exc, "delete", name) from exc

    def _wait_gone(self, name: str, timeout_s: float) -> None:
        """KubeRay's finalizer stops the Ray job first, so a deleted RayJob lingers for a moment."""
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise self._api_error(exc, "read", name) from exc
            if time.monotonic() >= deadline:
                raise KdrayError(
                    f"was deleted but still exists after {timeout_s} s (finalizer pending).",
                    where=f"RayJob {name!r}",
                    hint="Check that the KubeRay operator is running.",
                )
            time.sleep(self.DELETE_POLL_S)
