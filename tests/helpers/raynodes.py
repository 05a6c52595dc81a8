"""A Ray cluster of several real nodes on this machine (``ray.cluster_utils.Cluster``: real raylets), joined by
this process: ``with ray_nodes(3, cpus=1) as cluster: ...``.

The head has no CPUs, so every task and actor lands on one of the added nodes. The session's local Ray is
shut down first and this cluster on leaving, so later tests start their own again on demand.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

STORE = 96 * 1024**2  # each node's object store: small, for a 2-core machine


@contextlib.contextmanager
def ray_nodes(count: int, *, cpus: int) -> Iterator[Any]:
    """``count`` worker nodes of ``cpus`` CPUs each beside a CPU-less head; this process connected to them."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE},
    )
    try:
        for _ in range(count):
            cluster.add_node(num_cpus=cpus, object_store_memory=STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
