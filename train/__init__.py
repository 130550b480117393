"""gapcast.train: data loading, the ConFill model, losses, training loop, evaluation and baselines (cloud side)."""

from gapcast import GapcastError

__all__ = ["DataError", "TrainError"]


class DataError(GapcastError):
    """The data is missing, corrupt, or not in the expected layout."""


class TrainError(GapcastError):
    """Training or evaluation cannot go on (bad config, bad checkpoint)."""
