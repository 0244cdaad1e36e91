"""The paper's exposure and saturation jitter, applied to whole batches on the training device.

Loader workers only decode, crop, resize and flip uint8 pixels; each sample also draws its two colour
factors there, from its own seeded RNG (`draw_colour_factors`), so the augmentation still depends only on
the sample's seed. `model_input` then turns the uint8 batch into the model's float input on the device
and applies the factors to all images at once: one pass over the batch instead of float conversion and
colour work per image on the CPU, and four times fewer bytes to pass between processes and to copy.
"""
import math

import torch

# Exposure (brightness) and saturation factors: up to 1.5 either way, as in the paper. Drawn uniformly
# in log space, so darkening by 1/f is as likely as brightening by f.
MAX_COLOUR_FACTOR = 1.5
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses them.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


def draw_colour_factors(max_factor: float = MAX_COLOUR_FACTOR) -> torch.Tensor:
    """(exposure, saturation) float32 (2,), each log-uniform in [1 / max_factor, max_factor], from torch's RNG."""
    log_range = math.log(max_factor)
    return torch.empty(2).uniform_(-log_range, log_range).exp()


def jitter_colours_(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Exposure then saturation, per image, in place: float (N, 3, H, W) in [0, 1] and (N, 2) factors.

    The same operations as torchvision's adjust_brightness followed by adjust_saturation on each image:
    multiply RGB by the exposure factor, clamp to [0, 1]; blend with the image's grey level by the
    saturation factor, clamp again.
    """
    exposure, saturation = factors.view(-1, 2, 1, 1, 1).unbind(1)
    images.mul_(exposure).clamp_(max=1.0)  # pixels and factors are positive: nothing falls below 0
    # The weights travel as kernel arguments: a tensor made from them would be a copy from the host, which
    # on CUDA waits for the device's queue on every batch.
    red, green, blue = images.split(1, dim=1)
    grey = (red * LUMA_WEIGHTS[0]).add_(green, alpha=LUMA_WEIGHTS[1]).add_(blue, alpha=LUMA_WEIGHTS[2])
    return images.mul_(saturation).add_(grey.mul_(1.0 - saturation)).clamp_(0.0, 1.0)


def model_input(images: torch.Tensor, device: torch.device, colour_factors: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 (N, 3, H, W) batch -> float32 in [0, 1] on `device`, channels-last, colour-jittered if factors are given.

    Float batches (already in [0, 1]) pass through with only the move and the layout change.
    """
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    elif colour_factors is not None:
        images = images.clone()  # the jitter works in place: leave the caller's batch alone
    if colour_factors is not None:
        images = jitter_colours_(images, colour_factors.to(device, non_blocking=True))
    return images
