"""Evaluation suite: functional metrics (``metrics``), feature extractors (``features``), named presets
(``presets``), reconstruction/ground-truth folders (``io``) and the runner (``suite``).

``evaluate_reconstructions(recon_dirs, truth, preset)`` is imported lazily so that ``metrics`` stays light.
"""

__all__ = ["evaluate_reconstructions"]


def __getattr__(name):
    if name == "evaluate_reconstructions":
        from fmrirecon.evaluation.suite import evaluate_reconstructions

        return evaluate_reconstructions
    raise AttributeError(f"module 'fmrirecon.evaluation' has no attribute {name!r}")
