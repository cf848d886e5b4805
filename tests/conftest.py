"""Shared fixtures: models are resolved once per session (the SmolLM2 conversion is cached on disk)."""

from __future__ import annotations

import os

import pytest

import cli  # noqa: F401  the OpenMP and MKL defaults (cli/__init__.py), before anything loads torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    from partition.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from partition.models import resolve_model

    return resolve_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    from partition.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """The whole model as transformers loads it: the reference every split must match."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2.directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_cluster():
    """A broker and one tiny-llama worker as real processes, shared by the tests of one module."""
    from cli.cluster import LocalCluster

    cluster = LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.5)
    try:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        yield cluster
    finally:
        cluster.stop()
