"""fmrirecon: reconstruct seen images from fMRI with published methods on one data layer, trainer and
evaluation."""

__version__ = "0.1.0"
