"""kdcore.mixup: blended inputs and blended labels must describe the same blend."""

import pytest
import torch

from kdcore.mixup import Mixup, build_mixup, hard_labels


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    # Sample i is an image filled with the value i and labelled class i, so a blend's pixel value
    # must equal the expected class index under its blended label.
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return inputs, torch.arange(n)


def test_inputs_and_labels_are_blended_with_the_same_weight() -> None:
    inputs, labels = _batch()
    torch.manual_seed(0)
    mixed, soft = Mixup(1.0, num_classes=64)(inputs, labels, torch.Generator().manual_seed(0))

    assert mixed.shape == inputs.shape and soft.shape == (64, 64)
    assert torch.allclose(soft.sum(dim=1), torch.ones(64))
    assert (soft >= 0).all() and (soft.count_nonzero(dim=1) <= 2).all()
    expected_value = soft @ torch.arange(64, dtype=torch.float32)
    assert torch.allclose(mixed[:, 0, 0, 0], expected_value, atol=1e-4)
    assert torch.allclose(mixed, mixed[:, :, :1, :1].expand_as(mixed))  # every pixel blended alike
    blended = soft.max(dim=1).values < 0.99
    assert blended.sum() > 32, "Beta(1, 1) should leave few samples nearly whole"


def test_small_concentration_keeps_samples_nearly_whole() -> None:
    inputs, labels = _batch(256)
    torch.manual_seed(0)
    _, soft = Mixup(0.05, num_classes=256)(inputs, labels, torch.Generator().manual_seed(0))
    dominant = soft.max(dim=1).values
    assert (dominant > 0.95).float().mean() > 0.7


def test_same_seeds_same_blend_and_other_seeds_another() -> None:
    inputs, labels = _batch()
    mixup = Mixup(0.4, num_classes=64)

    def blend(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return mixup(inputs, labels, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(blend(3), blend(3))
    assert not torch.equal(blend(3), blend(4))


def test_zero_turns_mixup_off() -> None:
    assert build_mixup(0.0, 10) is None
    assert build_mixup(0.2, 10) == Mixup(0.2, 10)


@pytest.mark.parametrize(("labels", "expected"), [
    (torch.tensor([2, 0, 1]), [2, 0, 1]),
    (torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.0, 0.4]]), [1, 0]),
])
def test_hard_labels_of_indices_and_of_blends(labels: torch.Tensor, expected: list[int]) -> None:
    assert hard_labels(labels).tolist() == expected
