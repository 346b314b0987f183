"""Training: the loop, data loading, checkpoints, the method table, compare, torchrun support."""

from deltatune.train.data import Collator, DataError, DataSpec, encode, load_records
from deltatune.train.loop import TrainConfig, Trainer, TrainResult
from deltatune.train.methods import METHODS, available_methods
from deltatune.train.run import RunOptions, RunResult, run

__all__ = [
    "METHODS",
    "Collator",
    "DataError",
    "DataSpec",
    "RunOptions",
    "RunResult",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "available_methods",
    "encode",
    "load_records",
    "run",
]
