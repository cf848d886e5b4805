"""Errors raised while finding, converting or splitting a model."""

from __future__ import annotations


class PartitionError(Exception):
    """Base class for model and partitioning errors."""


class ModelNotFoundError(PartitionError):
    """A ``--model`` value names nothing we can load; the message says what to install or pass."""


class UnsupportedModelError(PartitionError):
    """The model loads, but its architecture family is not one we can split."""


class InvalidSplitError(PartitionError):
    """A layer range is outside ``[0, n_layers]`` or empty where layers are required."""


class WeightsMissingError(PartitionError):
    """A checkpoint lacks a tensor a segment needs (a truncated or mismatched file)."""
