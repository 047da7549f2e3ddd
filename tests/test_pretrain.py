import math

import pytest
import torch

from ctfm.pretrain.simclr import IntraSampleNTXentLoss, IntraSampleViewsd, prepare_views


def test_loss_is_chance_for_random_and_low_for_matched_views():
    n, d = 6, 256
    g = torch.Generator().manual_seed(0)
    random = IntraSampleNTXentLoss(num_crops=n, temperature=1.0)(torch.randn(2 * 2 * n, d, generator=g))
    assert abs(random.item() - math.log(2 * n - 1)) < 0.1  # no structure: chance level
    loss = IntraSampleNTXentLoss(num_crops=n, temperature=0.1)
    crops = torch.eye(d)[:n]  # orthogonal crop signatures, both views identical
    matched = loss(torch.cat([crops, crops]).repeat(2, 1))
    assert matched.item() < 1e-3


def test_negatives_come_only_from_the_same_scan():
    n, d = 4, 16
    loss = IntraSampleNTXentLoss(num_crops=n)
    g = torch.Generator().manual_seed(1)
    scan_a, scan_b = torch.randn(2 * n, d, generator=g), torch.randn(2 * n, d, generator=g)
    both = loss(torch.cat([scan_a, scan_b]))
    torch.testing.assert_close(both, (loss(scan_a) + loss(scan_b)) / 2)
    # scan b identical to scan a: a cross-scan loss would see perfect negatives and change; this one must not
    torch.testing.assert_close(loss(torch.cat([scan_a, scan_a])), loss(scan_a))


def test_loss_rejects_a_batch_of_the_wrong_size():
    with pytest.raises(ValueError, match="B \\* 2 \\* 4"):
        IntraSampleNTXentLoss(num_crops=4)(torch.randn(10, 8))


def test_views_shapes_determinism_and_difference():
    image = torch.rand(1, 24, 40, 40, generator=torch.Generator().manual_seed(0))
    make = IntraSampleViewsd("image", num_crops=3, crop_size=(16, 32, 32))
    out = make.set_random_state(seed=5)({"image": image, "id": 7})
    assert "image" not in out and out["id"] == 7
    assert out["view0"].shape == out["view1"].shape == (3, 1, 16, 32, 32)
    assert not torch.equal(out["view0"], out["view1"])
    again = make.set_random_state(seed=5)({"image": image})
    assert torch.equal(out["view0"], again["view0"]) and torch.equal(out["view1"], again["view1"])
    with pytest.raises(ValueError, match="smaller than crop"):
        make({"image": torch.rand(1, 8, 40, 40)})


def test_prepare_views_orders_scan_view_crop():
    b, n = 2, 3
    view0 = torch.arange(b * n).float().view(b, n, 1, 1, 1, 1)
    batch = {"view0": view0, "view1": view0 + 100}
    inputs, target = prepare_views(batch)
    assert target is None and inputs.shape == (b * 2 * n, 1, 1, 1, 1)
    assert inputs.flatten().tolist() == [0, 1, 2, 100, 101, 102, 3, 4, 5, 103, 104, 105]


def test_contrastive_step_learns_a_fixed_batch(small_encoder):
    """Gradients reach the encoder: on one fixed batch of views the loss drops far below chance."""
    from ctfm.networks import ContrastiveModel

    torch.manual_seed(0)
    model = ContrastiveModel(small_encoder.train())
    loss_fn = IntraSampleNTXentLoss(num_crops=4)
    make = IntraSampleViewsd("image", num_crops=4, crop_size=(16, 32, 32)).set_random_state(seed=0)
    image = torch.rand(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    views, _ = prepare_views({k: v[None] for k, v in make({"image": image}).items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = loss_fn(model(views)).item()
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_fn(model(views))
        loss.backward()
        optimizer.step()
    assert start > 1.0 and loss.item() < 0.1 * start
