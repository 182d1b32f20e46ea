"""PixCorr and SSIM on a torch device: the same numbers as :mod:`fmrirecon.evaluation.metrics` (numpy /
scikit-image), computed where the images already are (issue 21: on a GPU, SSIM on the CPU was most of the
``mindeye`` evaluation's time).

Both work in float64, on any device, and follow their references step by step:

- :func:`pixcorr`: ``metrics.pixcorr`` (Pearson r per image, a constant image scores
  ``metrics.UNDEFINED_CORRELATION`` under the same ``CONSTANT_ROW_ULPS`` test).
- :func:`ssim`: scikit-image ``structural_similarity`` with ``metrics.SSIM_KWARGS`` (Wang et al. 2004:
  Gaussian window σ = 1.5 truncated at 3.5 σ, an 11-tap filter; population covariance; K1 = 0.01,
  K2 = 0.03; ``data_range`` 1), the mean over the map cropped by the filter radius. Inside that crop the
  filter never reaches the border, so a valid (unpadded) separable convolution gives exactly the cropped
  map, whatever scipy's border mode. ``variant="per_column"`` is ``metrics.ssim``'s: 1-D SSIM along the
  height of every column (Brain-Diffuser's pinned scikit-image 0.17).
- :func:`rgb_to_gray`: scikit-image ``rgb2gray`` (weights 0.2125, 0.7154, 0.0721, in the input's float
  precision as scikit-image computes it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fmrirecon.evaluation.metrics import CONSTANT_ROW_ULPS, SSIM_KWARGS, UNDEFINED_CORRELATION

__all__ = ["pixcorr", "rgb_to_gray", "ssim", "ssim_where_fastest"]

# scikit-image rgb2gray (ITU-R BT.709 luma)
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)
SSIM_K1, SSIM_K2 = 0.01, 0.03  # structural_similarity defaults
SSIM_TRUNCATE = 3.5  # structural_similarity with gaussian_weights: an 11-tap filter at σ = 1.5


def _as_tensor(x, device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or numpy array, got {type(x).__name__}")
    return x.to(device) if device is not None else x


def pixcorr(recons, truths, *, device=None, return_undefined: bool = False):
    """Pixel correlation per image, as ``metrics.pixcorr``.

    Args:
        recons, truths: ``(N, ...)`` float images (tensors or arrays), each flattened with all channels.
        device: where to compute (default: where ``recons`` is).
    Returns:
        float64 numpy ``(N,)`` r (and the ``(N,)`` bool mask of undefined pairs with ``return_undefined``).
    """
    a, b = _as_tensor(recons, device), _as_tensor(truths, device)
    b = b.to(a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"pixcorr: both sets need the same image count, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"pixcorr: feature sizes differ per image, got {a.shape[1]} and {b.shape[1]}")
    a_c, a_constant = _centred_unit_rows(a)
    b_c, b_constant = _centred_unit_rows(b)
    undefined = a_constant | b_constant
    r = torch.where(undefined, torch.full_like(a_c[:, 0], UNDEFINED_CORRELATION), (a_c * b_c).sum(1))
    r, undefined = r.cpu().numpy(), undefined.cpu().numpy()
    return (r, undefined) if return_undefined else r


def _centred_unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copied from fmrirecon.evaluation.metrics._centred_unit_rows, in torch: ``(n, D)`` → float64 centred
    unit rows and ``(n,)`` bool rows constant up to rounding."""
    eps = torch.finfo(x.dtype if x.is_floating_point() else torch.float64).eps
    x = x.double()
    scale = torch.maximum(x.amax(1), -x.amin(1)) * math.sqrt(x.shape[1])
    x = x - x.mean(1, keepdim=True)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    constant = norms[:, 0] <= CONSTANT_ROW_ULPS * eps * scale
    return x / norms, constant


def rgb_to_gray(images) -> torch.Tensor:
    """``(N, 3, H, W)`` float in ``[0, 1]`` → ``(N, H, W)`` luminance, as scikit-image ``rgb2gray`` of the
    channels-last array."""
    x = _as_tensor(images, None)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_gray expects (N, 3, H, W) images, got shape {tuple(x.shape)}")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    return torch.einsum("nchw,c->nhw", x, weights)


def _gaussian_taps(sigma: float, device) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel: radius ``int(truncate·σ + 0.5)``, normalised, float64."""
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def ssim(recons, truths, variant: str = "2d", *, device=None) -> np.ndarray:
    """SSIM per image on grayscale images, as ``metrics.ssim`` (``SSIM_KWARGS``).

    Args:
        recons, truths: ``(N, H, W)`` float gray images in ``[0, 1]`` (tensors or arrays).
        variant: ``"2d"`` (MindEye) or ``"per_column"`` (Brain-Diffuser).
        device: where to compute (default: where ``recons`` is).
    Returns:
        float64 numpy ``(N,)``.
    """
    x, y = _as_tensor(recons, device).double(), _as_tensor(truths, device)
    y = y.to(device=x.device, dtype=torch.float64)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(
            f"ssim expects two equal (N, H, W) gray stacks, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if variant not in ("2d", "per_column"):
        raise ValueError(f"ssim variant must be '2d' or 'per_column', got {variant!r}")
    if not (SSIM_KWARGS["gaussian_weights"] and not SSIM_KWARGS["use_sample_covariance"]):
        raise NotImplementedError("device SSIM implements the Gaussian window with population covariance")
    taps = _gaussian_taps(SSIM_KWARGS["sigma"], x.device)
    k = len(taps)
    extent = (x.shape[1],) if variant == "per_column" else tuple(x.shape[1:])
    if min(extent) < k:
        raise ValueError(f"ssim: images must be at least {k} px along each filtered axis, got {extent}")

    def filt(z: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) → valid-filtered, separable
        z = F.conv2d(z, taps.view(1, 1, k, 1))
        return z if variant == "per_column" else F.conv2d(z, taps.view(1, 1, 1, k))

    c1 = (SSIM_K1 * SSIM_KWARGS["data_range"]) ** 2
    c2 = (SSIM_K2 * SSIM_KWARGS["data_range"]) ** 2
    x, y = x[:, None], y[:, None]
    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).cpu().numpy()


def ssim_where_fastest(recons: torch.Tensor, truths: torch.Tensor, variant: str = "2d") -> np.ndarray:
    """:func:`ssim` where the gray images are, except on the CPU: there scikit-image (``metrics.ssim``) is
    the faster of the two (scipy's filters ~6x torch's float64 convolutions: 32 pairs at 425 px, 0.7 s vs
    4.2 s on one core), with the same numbers."""
    if recons.device.type == "cpu":
        from fmrirecon.evaluation.metrics import ssim as reference_ssim

        return reference_ssim(recons.numpy(), truths.numpy(), variant)
    return ssim(recons, truths, variant)
