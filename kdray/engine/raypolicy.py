"""A Ray Train trainer that never retries a user error.

Ray Train V2 retries every worker failure up to ``FailureConfig.max_failures``. A ``KdrayError``
raised in a worker (bad data, a diverged loss, a corrupt checkpoint) fails the same way on every
attempt, so retrying it only delays the message. ``UserErrorPolicy`` wraps Ray's default failure
policy and raises at once when a worker failed with a ``KdrayError``; other failures (a killed
worker, a lost node) are retried as configured. This uses Ray Train's internal failure-policy
interface (there is no public one), so if it moves, ``trainer_class`` falls back to the plain
``TorchTrainer`` (user errors are then retried, and still reported cleanly by the driver).
"""

from __future__ import annotations

from typing import Any, Callable

from kdray.core.errors import KdrayError


def find_user_error(e: BaseException) -> KdrayError | None:
    """The KdrayError inside Ray's wrappers (causes, contexts, ``cause``, ``worker_failures``, ``controller_failure``)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        err = stack.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, KdrayError):  # a RayTaskError made an instance of its cause: the original is .cause
            inner = getattr(err, "cause", None)
            return inner if isinstance(inner, KdrayError) else err
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None)]
        stack.append(getattr(err, "controller_failure", None))
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None


def user_error_policy() -> Any:
    """Ray's default failure policy, made to raise a worker's user error at once (None: not available)."""
    try:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    except ImportError:  # another Ray layout: keep Ray's own retries
        return None

    class UserErrorPolicy(DefaultFailurePolicy):  # type: ignore[misc,valid-type]
        def make_decision(self, training_failed_error: Any) -> Any:
            if find_user_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorPolicy


def trainer_class() -> Callable[..., Any]:
    """``TorchTrainer``, made to raise a user error at once instead of retrying it."""
    from ray.train.torch import TorchTrainer

    policy = user_error_policy()
    if policy is None:
        return TorchTrainer

    class KdrayTorchTrainer(TorchTrainer):  # type: ignore[misc,valid-type]
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            given = kwargs.get("failure_policy")
            if given is not None and hasattr(given, "failure_config"):
                kwargs["failure_policy"] = policy(given.failure_config)
            return super()._initialize_and_run_controller(**kwargs)  # type: ignore[misc]

    return KdrayTorchTrainer
