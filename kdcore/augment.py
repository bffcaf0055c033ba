"""Batch-level augmentations, run on the training device on the already-preprocessed float batch.

Every sample of a batch gets its own random transform, but the work is done for the whole batch
at once (pad, then two gathers), so augmentation costs about as much as one extra copy of the
batch. Randomness comes from the `torch.Generator` handed in, so a seeded run repeats exactly.

Names follow `DataSpec.augment`:
* none: no augmentation; teacher outputs can then be computed once and cached.
* shift: random translation by up to 2 px in each direction (the jitter of Hinton et al. on MNIST).
* flip_crop: random horizontal flip, then a random crop of the image padded by 4 px (CIFAR style).

Padding uses `fill` (per channel), 0 by default; pass `Preprocess.zero_value` to pad with what a
black pixel becomes after normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from kdcore.errors import MismatchError

AugmentFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
Fill = float | Sequence[float] | torch.Tensor

SHIFT_PIXELS = 2
CROP_PADDING = 4
AUGMENTS = ("none", "shift", "flip_crop")


def _randint(high: int, size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Integers in [0, high) drawn on the generator's device (it must match), then moved to the batch's."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (size,), generator=generator, device=gen_device).to(device)


def _padded(x: torch.Tensor, pad: int, fill: Fill) -> torch.Tensor:
    n, c, h, w = x.shape
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if value.numel() not in (1, c):
        raise MismatchError(f"augment fill has {value.numel()} values but the batch has {c} channels")
    out = value.reshape(1, -1, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    out[:, :, pad : pad + h, pad : pad + w] = x
    return out


def translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None, fill: Fill = 0.0) -> torch.Tensor:
    """Shift every sample by its own random (dy, dx) in [-max_shift, max_shift], filling the gap.

    Equivalent to padding by `max_shift` and taking a random crop of the original size.
    """
    n, c, h, w = x.shape
    padded = _padded(x, max_shift, fill)
    span = 2 * max_shift + 1
    top = _randint(span, n, generator, x.device)
    left = _randint(span, n, generator, x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # N x H, rows of the padded image to keep
    cols = left[:, None] + torch.arange(w, device=x.device)  # N x W
    picked_rows = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
    return picked_rows.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_hflip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror a random half (in expectation) of the samples left to right."""
    flip = _randint(2, x.shape[0], generator, x.device).bool()
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def shift(x: torch.Tensor, generator: torch.Generator | None = None, *, fill: Fill = 0.0) -> torch.Tensor:
    """Random translation by up to +-2 px per sample."""
    return translate(x, SHIFT_PIXELS, generator, fill)


def flip_crop(x: torch.Tensor, generator: torch.Generator | None = None, *, fill: Fill = 0.0) -> torch.Tensor:
    """Random horizontal flip, then a random crop of the 4-px padded image."""
    return translate(random_hflip(x, generator), CROP_PADDING, generator, fill)


def build_augment(name: str, *, fill: Fill = 0.0) -> AugmentFn | None:
    """The batch augmentation called `name`, or None for "none"."""
    if name == "none":
        return None
    if name == "shift":
        return partial(shift, fill=fill)
    if name == "flip_crop":
        return partial(flip_crop, fill=fill)
    raise ValueError(f"unknown augment {name!r}; known: {', '.join(AUGMENTS)}")


def augment_is_random(name: str) -> bool:
    """Whether the augmentation changes inputs from epoch to epoch (teacher outputs cannot be cached)."""
    return name != "none"


def check_augment_fits(name: str, input_shape: tuple[int, ...]) -> None:
    """Image augmentations need C x H x W samples; refuse them for feature vectors, naming the field."""
    if name != "none" and len(input_shape) != 3:
        raise MismatchError(
            f"{name!r} moves pixels, but the samples are {input_shape[0]} features, not images; use none",
            field="data.augment",
        )
