"""NeuralDiffuser (Li, Wu & Chen): fMRI → SD latent / text condition / CLIP-layer features, then primary
visual feature guided img2img (``../shared/papers/neuraldiffuser.txt``).

Read in order: ``model.py`` (decoders, §4.2–4.3), ``train.py`` (targets and stages, §4.2.3), ``pipeline.py``
(Algorithm 1), ``retrieval.py`` (§5.3), ``method.py`` (config, runs and the ReconMethod interface).
"""

from fmrirecon.methods.neuraldiffuser.method import (
    NeuralDiffuser,
    NeuralDiffuserMethodConfig,
    NeuralDiffuserTraining,
)

__all__ = ["NeuralDiffuser", "NeuralDiffuserMethodConfig", "NeuralDiffuserTraining"]
