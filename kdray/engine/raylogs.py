"""Ray's log levels for kdray, set in every Ray worker process (``worker_process_setup_hook``) and the driver.

A module of its own, importing only ``logging`` and Ray: the hook runs in *every* Ray worker process
(Ray Train's controller, its helper actors and idle pool workers), so pointing it at a module that imports
torch and kdray's loop would add those imports to each of them, the controller's start-up included.
"""

from __future__ import annotations

import logging


def quiet_ray_logs() -> None:
    """Keep Ray Train's per-report INFO lines (and a state-API warning without a dashboard) out of the log."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # streamed data: each epoch's execution plan at INFO
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:  # this one logs every report at INFO under a logger named by its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
