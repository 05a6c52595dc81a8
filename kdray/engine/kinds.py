"""The stage kinds that ship with kdray. Importing this module registers them; kinds from other
packages come through the ``kdray.stage_kinds`` entry-point group (``STAGE_KINDS.load_plugins``)."""

from kdray import adapt, distill, evaluate, supervised, transfer  # noqa: F401
from kdray.supervised import pretrained  # noqa: F401
