"""Errors a user can act on. Each message says what was wrong, what was expected and what to do."""


class HFPruneError(Exception):
    """Base class of every error hf_prune raises on purpose."""


class RecipeError(HFPruneError, ValueError):
    """A recipe, step or command-line option is malformed or out of range."""


class UnsupportedModelError(HFPruneError, ValueError):
    """The model's architecture cannot be handled (no adapter, unsupported layout)."""


class CalibrationDataError(HFPruneError, ValueError):
    """Calibration or evaluation text cannot be found or is too short for the request."""


class PruningCheckError(HFPruneError, RuntimeError):
    """A check after pruning failed (sparsity, N:M pattern, NaN/inf): nothing is saved."""


class OutputExistsError(HFPruneError, FileExistsError):
    """The output folder is not empty (or is the model's own folder) and overwriting was not asked for."""
