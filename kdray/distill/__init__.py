"""Knowledge distillation: a teacher trains a smaller student through weighted loss terms.

``stage`` (the ``distill`` stage kind), ``losses`` (``LOSSES``), ``cache`` (teacher outputs computed
once), ``datafree`` (inputs synthesised from the teacher's BatchNorm statistics).
"""

from kdray.distill import stage, token_losses  # noqa: F401  (registers the stage kind and the token-level losses)
