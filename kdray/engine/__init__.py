"""The engine: the pipeline spec, stage keys and the lineage cache, the training loop and its Ray
Train driver, the launchers (local, ray, kuberay), remote stages and sweeps."""
