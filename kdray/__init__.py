"""kdray: knowledge transfer, distillation and domain adaptation as scheduled, distributed jobs."""

__version__ = "0.1.0"
