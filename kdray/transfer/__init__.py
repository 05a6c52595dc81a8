"""Cross-network knowledge transfer: ``W_target = W_source`` with a reported mapping, shared layers,
parameters tied between two networks, L2-SP, and transferability scores (LogME, LEEP).

``mapping`` (rules, adapters, the report), ``stage`` (the ``transfer`` kind), ``share`` (the ``share``
kind), ``transferability`` and ``scoring`` (ranking sources without training).
"""

from kdray.transfer import share, stage  # noqa: F401  (registers the stage kinds)
