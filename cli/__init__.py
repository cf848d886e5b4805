"""The ``edgecloud`` command line (typer): one sub-command per role, plus demo, plan, calibrate."""

import os

# OpenMP settings for CPU inference, applied before anything loads torch (a user's own values win).
# Two torch processes share the cores when the edge and a worker run on one machine (the demo, the
# tests, a laptop): idle OpenMP threads spinning for long steal the other process's core, and an
# unbound pool woken after a wait can land with both threads on one core. Measured on 2 cores,
# SmolLM2 split 15 (BENCHMARKS.md, "OpenMP threads of two processes"): without binding, some
# generations ran 4-5x slower than the rest; bound, none did.
# MKL_DYNAMIC off: MKL may otherwise run a product on fewer threads than asked when the machine is
# busy, and which kernel a product gets depends on the thread count; packed batches
# (partition/batching.py) rely on the kernels their probe saw.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "30000", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores",
                   "MKL_DYNAMIC": "FALSE"}
for _name, _value in OPENMP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

# Binding pins the thread that runs torch's first parallel region to the first core, and every
# process started from that thread inherits the pin: a demo, test or bench that had run torch
# before starting its workers gave each worker one core of two (measured: 47-55 ms per SmolLM2
# decode step instead of 27-30, one core busy). So the first edgecloud process records the CPUs
# it was given, before torch loads, and each process it starts takes them back.
CPUS_VARIABLE = "EDGECLOUD_CPUS"
if hasattr(os, "sched_setaffinity"):
    if os.environ.get(CPUS_VARIABLE):
        try:
            os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_VARIABLE].split(",")})
        except (ValueError, OSError):
            pass  # a malformed value, or CPUs this process may not use: keep what it was given
    else:
        os.environ[CPUS_VARIABLE] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
