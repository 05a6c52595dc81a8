"""Domain adaptation: a model trained on a labelled source domain adapted to a shifted target domain.

``methods`` (``ADAPT_METHODS``: source_only, dann, mmd, coral, entropy_min, shot), ``stage`` (the
``adapt`` kind: validators, the selection rule, the source-only baseline).
"""

from kdray.adapt import stage  # noqa: F401  (registers the stage kind)
