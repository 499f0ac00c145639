"""Video similarity: PSNR and SSIM of a video against a reference, per video, in torch."""

from __future__ import annotations


import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]


def psnr(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per video of ``(B, C, T, H, W)`` tensors in [-1, 1] (peak: the [0, 1] range); inf where equal."""
    mse = (((video.float() - reference.float()) / 2) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)  # mse 0 -> inf


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return (g / g.sum()).float()


def ssim(video: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per video (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1), the mean
    over frames, channels and valid window positions. ``(B, C, T, H, W)`` tensors in [-1, 1]."""
    b, c, t, h, w = video.shape
    x = ((video.float() + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    y = ((reference.float() + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    g = _gaussian_window(window, sigma).to(x.device)
    blur = lambda z: F.conv2d(F.conv2d(z, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))  # separable, no padding
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, -1).mean(dim=1)
