"""Domain exceptions raised at the public boundary (STYLE.md §4).

Each message says what was expected and what was found, and names the path or value involved.
"""


class FmriReconError(Exception):
    """Base class for every error fmrirecon raises on purpose."""


class DatasetLayoutError(FmriReconError):
    """A dataset folder or file does not follow the expected on-disk layout."""


class CorruptFileError(DatasetLayoutError):
    """A file of a store, run folder or reconstruction folder fails its checksum or recorded digest."""


class StoreCorruptionError(CorruptFileError):
    """A prepared store's file fails its checksum or digest (damaged on disk or in a copy)."""


class RunLockedError(FmriReconError):
    """Another process is training into the same run folder."""


class SubjectMismatchError(FmriReconError):
    """Data, a store or a run belongs to another subject (or another store) than the one asked for."""


class ConfigError(FmriReconError):
    """An unknown config key, a wrong type, or a run resumed with a different config."""


class WeightsUnavailableError(FmriReconError):
    """Pretrained weights could not be found locally (no download is attempted)."""


class EvaluationInputError(FmriReconError):
    """Reconstructions and ground truth cannot be paired or read."""
