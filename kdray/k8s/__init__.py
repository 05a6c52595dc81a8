"""Kubernetes: RayJob/RayCluster rendering (``render``, pure functions), offline validation against
KubeRay's CRDs (``validate``) and the RayJob client (``client``, the only module that talks to the API)."""
