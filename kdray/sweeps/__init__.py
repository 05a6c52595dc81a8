"""Sweeps: many variants of one stage as Ray Tune trials over the engine (ASHA, docs/sweeps.md), and the
Pareto report that chooses a student within a budget. Above the engine: a stage kind takes part only
through ``StageKind.prepare_trials`` (what its trials share)."""
