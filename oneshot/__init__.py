"""oneshot: one-shot post-training pruning for Hugging Face models.

import oneshot
report = oneshot.prune(model, tokenizer, method="sparsegpt", sparsity=0.5)
print(report.summary())
"""

from oneshot.api import Report, evaluate_perplexity, prune
from oneshot.calibration.data import CalibrationSet
from oneshot.config import CalibrationConfig, PruneConfig
from oneshot.errors import ConfigError, DataError, ModelError, NumericalError, OneshotError, OutputError
from oneshot.loading import load_model
from oneshot.methods.registry import list_methods

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "ConfigError",
    "DataError",
    "ModelError",
    "NumericalError",
    "OneshotError",
    "OutputError",
    "PruneConfig",
    "Report",
    "evaluate_perplexity",
    "list_methods",
    "load_model",
    "prune",
]
