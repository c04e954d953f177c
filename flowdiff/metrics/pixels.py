"""8-bit images and densities: uniform dequantisation and bits per dimension on the 8-bit scale,
as Song et al. (2021) report them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdiff.utils import UsageError

PIXEL_SCALE = 1 / 127.5
"""Width of one 8-bit level in the model's pixel range: ``x = v / 127.5 - 1`` maps ``v`` in
[0, 255] to [-1, 1] (:func:`pixels_to_float`). The one definition used by
``dequantize`` and ``bits_per_dim``."""

PIXEL_OFFSET = -1.0
"""Where pixel value 0 lands in the model's pixel range (see ``PIXEL_SCALE``)."""


def pixels_to_float(images: Tensor) -> Tensor:
    """uint8 pixels ``v`` to float32 ``v / 127.5 - 1`` in [-1, 1]: the model's pixel range."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def dequantize(
    pixels: Tensor,
    generator: torch.Generator | None = None,
    scale: float = PIXEL_SCALE,
    offset: float = PIXEL_OFFSET,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform dequantisation into the model's pixel range: ``x = scale (v + u - 1/2) + offset``.

    ``u ~ U[0, 1)`` per pixel, so ``y = v + u - 1/2`` fills the unit cell centred on the pixel
    value ``v`` (the cells tile ``[-1/2, 255.5)``) and ``E_u[x] = scale v + offset``, the value the
    model was trained on (``v / 127.5 - 1`` by default). A density on these ``x`` is a density on
    ``y`` after the change of variables in ``bits_per_dim``.

    Args:
        pixels: integer pixel values ``v`` in [0, 255], any shape (B, *D).
        generator: source of ``u`` (the global generator when None).
        scale: the slope of the affine map ``x = scale v + offset`` the model was trained with.
        offset: its offset.
        dtype: floating dtype of the result.

    Returns:
        ``x`` shaped like ``pixels``, on its device.
    """
    if pixels.is_floating_point() or pixels.is_complex():
        raise UsageError(f"dequantize expects integer pixel values, got {pixels.dtype}")
    device = generator.device if generator is not None else pixels.device
    u = torch.rand(pixels.shape, generator=generator, device=device, dtype=dtype)
    return scale * (pixels.to(dtype) + u.to(pixels.device) - 0.5) + offset


def bits_per_dim(log_prob_x: Tensor, num_dims: int, scale: float = PIXEL_SCALE) -> Tensor:
    """Bits per dimension on the 8-bit scale from the model's ``log p_x(x)`` (nats).

    The model's pixels are ``x = scale y + offset`` with ``y`` the dequantised 8-bit value in
    ``[-1/2, 255.5)``, so ``p_y(y) = p_x(x) scale^D`` and::

        bpd = -log p_y(y) / (D ln 2) = -(log p_x(x) + D log scale) / (D ln 2)
            = nll_x / (D ln 2) - log2(scale)        (+ log2(127.5) for the default scale)

    With ``y`` dequantised uniformly, ``E_u[-log2 p_y(v + u - 1/2)] / D`` bounds the bits per
    dimension of the discrete model ``P(v) = int_cell p_y`` from above (Jensen).

    Args:
        log_prob_x: ``log p_x(x)`` (B,), e.g. ``log_likelihood(...).log_prob``.
        num_dims: D, the number of dimensions of one sample (C H W).
        scale: the width of one 8-bit level in the model's pixel range.

    Returns:
        bits per dimension (B,).
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise UsageError(f"num_dims must be a positive integer, got {num_dims}")
    if not scale > 0:
        raise UsageError(f"scale must be positive, got {scale}")
    return -(log_prob_x + num_dims * math.log(scale)) / (num_dims * math.log(2))
