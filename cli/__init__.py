"""The ``edgecloud`` command line (typer): one sub-command per role, plus demo, plan, calibrate."""

import os

# OpenMP settings for CPU inference, applied before anything loads torch (a user's own values win).
# Two torch processes share the cores when the edge and a worker run on one machine (the demo, the
# tests, a laptop): idle OpenMP threads spinning for long steal the other process's core, and an
# unbound pool woken after a wait can land with both threads on one core. Measured on 2 cores,
# SmolLM2 split 15 (BENCHMARKS.md, "OpenMP threads of two processes"): without binding, some
# generations ran 4-5x slower than the rest; bound, none did.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "30000", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
for _name, _value in OPENMP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
