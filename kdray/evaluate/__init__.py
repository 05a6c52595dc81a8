"""The ``evaluate`` stage: accuracy, size, speed and relations (teacher agreement, gain over scratch)."""

from kdray.evaluate import stage  # noqa: F401  (registers the stage kind)
