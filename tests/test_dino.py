"""FM-CT's recipe (DINO + masked image modelling) piece by piece, at tiny widths: ``ctfm.pretrain.dino``,
``ctfm.pretrain.ema``, ``ctfm.networks.dino`` and the ViT backbone ``ctfm.networks.vit``."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from ctfm.checkpoint import load_encoder, save_hf_folder
from ctfm.networks import CTFMEncoder, CTFMViT, DINOHead, DINOModel
from ctfm.networks.dino import mask_input
from ctfm.pretrain.dino import (
    DINOLoss,
    DINOStudentUpdate,
    DINOTeacherUpdate,
    MultiCropViewsd,
    block_mask,
    loss_terms,
    param_groups,
    prepare_multicrop,
)
from ctfm.pretrain.ema import cosine_schedule, ema_update_, linear_warmup

K = 32


def tiny_vit(**kw) -> CTFMViT:
    args = {"img_size": (16, 32, 32), "patch_size": (8, 8, 8), "hidden_size": 24, "mlp_dim": 32, "num_layers": 2, "num_heads": 2}
    return CTFMViT(**{**args, **kw})


def outputs(b: int = 2, n_local: int = 2, n: int = 8, seed: int = 0, masked=None) -> dict:
    """A DINOModel-shaped output of random logits: ``b`` scans, ``n`` patch positions per global crop."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * b, n, dtype=torch.bool) if masked is None else masked
    return {
        "student": torch.randn((2 + n_local) * b, K, generator=g),
        "teacher": torch.randn(2 * b, K, generator=g),
        "teacher_embedding": torch.randn(2 * b, 16, generator=g),
        "student_patches": torch.randn(2 * b, n, K, generator=g),
        "teacher_patches": torch.randn(2 * b, n, K, generator=g),
        "masks": masks,
    }


def test_masked_modelling_loss_sees_only_masked_positions():
    masks = torch.zeros(4, 8, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[3, 2] = True
    base = outputs(masked=masks)
    reference = DINOLoss(K, mim_weight=1.0)(base)
    changed_unmasked = {**base, "student_patches": base["student_patches"].clone()}
    changed_unmasked["student_patches"][~masks] += torch.randn(int((~masks).sum()), K) * 5
    changed_unmasked["teacher_patches"] = base["teacher_patches"].clone()
    changed_unmasked["teacher_patches"][~masks] += 3.0  # the teacher's unmasked positions only move the centre (after)
    again = DINOLoss(K, mim_weight=1.0)
    assert again(changed_unmasked) == reference  # exactly: the unmasked positions are not in the sum
    changed_masked = {**base, "student_patches": base["student_patches"].clone()}
    changed_masked["student_patches"][0, 5] += torch.randn(K) * 5
    assert DINOLoss(K, mim_weight=1.0)(changed_masked) != reference
    # weight 0: the patch term is gone, the loss is DINO's alone
    alone = DINOLoss(K, mim_weight=0.0)
    assert alone(changed_masked) == alone.terms["dino_loss"] == DINOLoss(K, mim_weight=0.0)(base)


def test_masked_modelling_loss_is_zero_without_masks_and_terms_are_logged():
    loss = DINOLoss(K, mim_weight=0.5)
    value = loss(outputs())
    assert loss.terms["mim_loss"] == 0.0 and loss.terms["masked_fraction"] == 0.0
    assert value.item() == pytest.approx(loss.terms["dino_loss"])
    assert 0 < loss.terms["teacher_entropy"] <= math.log(K) + 1e-5
    assert loss.terms["teacher_entropy"] <= loss.terms["teacher_marginal_entropy"] + 1e-5
    assert loss.terms["embedding_std"] > 0


def test_dino_loss_pairs_each_teacher_crop_with_every_other_student_crop():
    out = outputs(b=1, n_local=1)
    loss = DINOLoss(K, mim_weight=0.0)
    t = torch.softmax(out["teacher"] / loss.teacher_temperature, dim=-1)
    log_s = torch.log_softmax(out["student"] / loss.student_temperature, dim=-1)
    pairs = [(i, v) for i in range(2) for v in range(3) if v != i]
    expected = sum(float(-(t[i] * log_s[v]).sum()) for i, v in pairs) / len(pairs)
    assert loss(out).item() == pytest.approx(expected, rel=1e-5)


def test_centering_follows_the_teacher_logits():
    loss = DINOLoss(K, center_momentum=0.9)
    out = outputs(masked=torch.ones(4, 8, dtype=torch.bool))
    loss(out)
    torch.testing.assert_close(loss.center, 0.1 * out["teacher"].mean(0, keepdim=True))
    torch.testing.assert_close(loss.patch_center, 0.1 * out["teacher_patches"].flatten(0, 1).mean(0, keepdim=True))
    first = loss.center.clone()
    loss(out)
    torch.testing.assert_close(loss.center, 0.9 * first + 0.1 * out["teacher"].mean(0, keepdim=True))
    assert "center" in loss.state_dict() and "patch_center" in loss.state_dict()  # checkpointed with the loss


def test_ema_update_is_exact():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    before = [p.detach().clone().double() for p in teacher.parameters()]
    m = 0.994
    ema_update_(teacher, student, m)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        expected = m * t0 + (1 - m) * s.detach().double()
        torch.testing.assert_close(t.detach().double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(t.detach().double(), t0)
    frozen = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), frozen))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="not copies"):
        ema_update_(teacher, torch.nn.Sequential(student, torch.nn.Linear(3, 1)), 0.5)


def test_schedules_hit_their_endpoints():
    assert cosine_schedule(0, 100, 0.994, 1.0) == pytest.approx(0.994, abs=1e-12)
    assert cosine_schedule(100, 100, 0.994, 1.0) == 1.0
    assert cosine_schedule(250, 100, 0.994, 1.0) == 1.0
    assert cosine_schedule(50, 100, 0.994, 1.0) == pytest.approx(0.997)
    values = [cosine_schedule(i, 100, 0.994, 1.0) for i in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert linear_warmup(0, 30, 0.02, 0.04) == 0.02
    assert linear_warmup(15, 30, 0.02, 0.04) == pytest.approx(0.03)
    assert linear_warmup(30, 30, 0.02, 0.04) == linear_warmup(31, 30, 0.02, 0.04) == 0.04
    assert linear_warmup(0, 0, 0.02, 0.04) == 0.04
    model = DINOModel(CTFMEncoder(init_filters=2, blocks_down=(1, 1, 1, 1, 1)), num_prototypes=K, hidden_features=8, bottleneck_features=4)
    update = DINOTeacherUpdate(model, DINOLoss(K), total_iterations=10, warmup_iterations=4)
    assert update.momentum_at(0) == pytest.approx(0.994) and update.momentum_at(10) == 1.0
    assert update.temperature_at(0) == 0.02 and update.temperature_at(4) == 0.04


def test_head_last_layer_is_weight_normalised():
    head = DINOHead(12, num_prototypes=K, hidden_features=16, bottleneck_features=8)
    norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(K))
    assert not head.last_layer.weight_g.requires_grad
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(K))  # still unit rows after a step
    assert head(torch.randn(3, 5, 12)).shape == (3, 5, K)
    free = DINOHead(12, num_prototypes=K, hidden_features=16, bottleneck_features=8, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad


def test_teacher_gets_no_gradients_and_sees_the_unmasked_input():
    torch.manual_seed(0)
    model = DINOModel(tiny_vit(), num_prototypes=K, hidden_features=16, bottleneck_features=8)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    x = torch.rand(2, 1, 16, 32, 32)
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    masks[:, 0, :2, :2] = True
    out = model(x, torch.rand(2, 1, 8, 16, 16), masks)
    assert out["student"].shape == (4, K) and out["teacher"].shape == (2, K) and out["masks"].shape == (2, 32)
    assert out["student_patches"].shape == out["teacher_patches"].shape == (2, 32, K)
    DINOLoss(K)(out).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.backbone.patch_embedding.patch_embeddings.weight.grad is not None
    with torch.no_grad():  # teacher = the same weights as the student at start: unmasked input gives the teacher's output
        _, unmasked, _ = model.student(x)
    torch.testing.assert_close(out["teacher"], unmasked)
    masked = mask_input(x, masks)
    assert (masked[:, :, :8, :16, :16] == 0).all() and torch.equal(masked[:, :, 8:], x[:, :, 8:])
    with pytest.raises(ValueError, match="deepest map"):
        model(x, None, torch.zeros(2, 1, 4, 4, dtype=torch.bool))


def test_cnn_encoder_runs_the_recipe_on_its_deepest_map():
    model = DINOModel(CTFMEncoder(init_filters=2), num_prototypes=K, hidden_features=8, bottleneck_features=4)
    masks = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 1] = True
    out = model(torch.rand(2, 1, 16, 32, 32), torch.rand(4, 1, 16, 16, 16), masks)
    assert out["student"].shape == (6, K) and out["student_patches"].shape == (2, 4, K)
    assert "student_patches" not in model(torch.rand(2, 1, 16, 32, 32))  # no masks: no patch logits


def test_param_groups_leave_biases_and_norms_unregularised():
    model = DINOModel(CTFMEncoder(init_filters=2), num_prototypes=K, hidden_features=8, bottleneck_features=4)
    decayed, plain = param_groups(model.student)
    names = {id(p): n for n, p in model.student.named_parameters()}
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decayed
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in plain["params"])  # norm weights are 1-d
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decayed["params"])
    trainable = [p for p in model.student.parameters() if p.requires_grad]
    assert len(decayed["params"]) + len(plain["params"]) == len(trainable)  # the fixed weight norm is left out
    assert not any(p is model.student.head.last_layer.weight_g for p in decayed["params"] + plain["params"])


def test_student_update_schedules_weight_decay_clips_and_freezes_the_last_layer():
    """DINO's step around the trainer's: weight decay on its cosine, the global gradient norm clipped, the head's last
    layer untouched while frozen (the trainer's events, in MONAI's order: started, backward, optimiser, completed)."""
    torch.manual_seed(0)
    model = DINOModel(CTFMEncoder(init_filters=2), num_prototypes=K, hidden_features=8, bottleneck_features=4)
    loss_fn = DINOLoss(K)
    optimizer = torch.optim.AdamW(param_groups(model.student), lr=1e-2, weight_decay=0.04)
    update = DINOStudentUpdate(optimizer, model, total_iterations=4, weight_decay=0.04, weight_decay_end=0.4, clip_grad=1e-3,
                               freeze_last_layer_iterations=2)
    seen = []

    def step(engine, _):
        optimizer.zero_grad()
        loss_fn(model(torch.rand(2, 1, 16, 32, 32), torch.rand(2, 1, 16, 16, 16))).backward()
        raw = torch.nn.utils.clip_grad_norm_([p for p in model.student.parameters() if p.grad is not None], math.inf)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        clipped = torch.nn.utils.clip_grad_norm_([p for p in model.student.parameters() if p.grad is not None], math.inf)
        last = model.student.head.last_layer.weight_v.detach().clone()
        first = model.student.backbone.conv_init.weight.detach().clone()
        optimizer.step()
        seen.append({"raw": float(raw), "clipped": float(clipped), "weight_decay": [g["weight_decay"] for g in optimizer.param_groups],
                     "last_moved": not torch.equal(last, model.student.head.last_layer.weight_v),
                     "first_moved": not torch.equal(first, model.student.backbone.conv_init.weight)})
        return {"loss": torch.tensor(0.0)}

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    update.attach(engine)
    terms = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: terms.append(e.state.output["terms"]))
    engine.run(range(4), max_epochs=1)
    assert [s["weight_decay"] for s in seen] == [[pytest.approx(cosine_schedule(i, 4, 0.04, 0.4)), 0.0] for i in range(4)]
    assert all(s["clipped"] <= 1e-3 * (1 + 1e-4) < s["raw"] for s in seen)
    assert [t["grad_norm"] for t in terms] == pytest.approx([s["raw"] for s in seen], rel=1e-5)  # logged before clipping
    assert [s["last_moved"] for s in seen] == [False, False, True, True] and all(s["first_moved"] for s in seen)
    assert terms[0]["weight_decay"] == pytest.approx(0.04) and terms[0]["learning_rate"] == pytest.approx(1e-2)


def test_student_update_acts_only_when_the_optimiser_steps_under_gradient_accumulation():
    """MONAI's trainer with ``accumulation_steps`` 2 and epochs of 3 steps the optimiser at iterations 2 and 3 (the
    epoch's last): clipping there only, on the accumulated gradients."""
    model = DINOModel(CTFMEncoder(init_filters=2), num_prototypes=K, hidden_features=8, bottleneck_features=4)
    update = DINOStudentUpdate(torch.optim.AdamW(param_groups(model.student)), model, total_iterations=6, clip_grad=1e-6)
    clipped = []
    for iteration in (1, 2, 3, 4):
        for p in model.student.parameters():
            p.grad = torch.ones_like(p)
        engine = SimpleNamespace(state=SimpleNamespace(iteration=iteration, epoch_length=3), accumulation_steps=2)
        update.after_backward(engine)
        clipped.append(bool(model.student.backbone.conv_init.weight.grad.abs().max() < 1e-3))
    assert clipped == [False, True, True, False]


def test_views_have_the_right_shapes_and_are_repeatable():
    image = torch.rand(1, 24, 48, 48, generator=torch.Generator().manual_seed(0))
    make = MultiCropViewsd("image", global_crop_size=(20, 40, 40), global_size=(16, 32, 32), local_crop_size=(12, 12, 12),
                           local_size=(8, 16, 16), num_local_crops=3, mask_grid=(2, 4, 4), mask_probability=1.0)
    out = make.set_random_state(seed=3)({"image": image, "id": 1})
    assert "image" not in out and out["id"] == 1
    assert out["global_views"].shape == (2, 1, 16, 32, 32) and out["global_views"].dtype == torch.float32
    assert out["local_views"].shape == (3, 1, 8, 16, 16)
    assert out["masks"].shape == (2, 2, 4, 4) and out["masks"].dtype == torch.bool
    assert not torch.equal(out["global_views"][0], out["global_views"][1])
    fractions = out["masks"].flatten(1).float().mean(1)
    assert ((fractions > 0) & (fractions <= 0.5 + 1 / 32)).all()
    again = make.set_random_state(seed=3)({"image": image})
    assert all(torch.equal(out[k], again[k]) for k in ("global_views", "local_views", "masks"))
    plain = MultiCropViewsd("image", global_crop_size=(16, 32, 32), global_size=None, num_local_crops=0, local_crop_size=(64, 64, 64))
    out = plain.set_random_state(seed=0)({"image": image})
    assert sorted(out) == ["global_views"] and out["global_views"].shape == (2, 1, 16, 32, 32)
    with pytest.raises(ValueError, match="smaller than the global crop"):
        make({"image": torch.rand(1, 8, 48, 48)})
    with pytest.raises(ValueError, match="does not divide"):
        MultiCropViewsd(global_crop_size=(16, 32, 32), global_size=None, mask_grid=(3, 4, 4))


def test_block_mask_covers_the_drawn_ratio_at_most():
    rng = np.random.RandomState(0)
    for ratio in (0.0, 0.1, 0.3, 0.5):
        mask = block_mask((4, 6, 6), ratio, rng)
        assert mask.shape == (4, 6, 6) and mask.sum() <= round(ratio * mask.size)
        assert mask.sum() >= 0.8 * round(ratio * mask.size)


def test_prepare_multicrop_is_crop_major():
    b = 2
    glob = torch.arange(b * 2).float().view(b, 2, 1, 1, 1, 1)
    batch = {"global_views": glob, "local_views": glob[:, :1] + 10, "masks": torch.ones(b, 2, 1, 1, 1, dtype=torch.uint8)}
    g, target, (local, masks), kwargs = prepare_multicrop(batch)
    assert target is None and kwargs == {}
    assert g.flatten().tolist() == [0, 2, 1, 3] and local.flatten().tolist() == [10, 12] and masks.dtype == torch.bool
    assert prepare_multicrop({"global_views": glob})[2] == (None, None)


def test_loss_terms_read_the_handler_output():
    assert loss_terms({"loss": torch.tensor(2.5), "terms": {"dino_loss": 2.0}}) == {"train_loss": 2.5, "dino_loss": 2.0}


def test_vit_export_loads_back_through_the_shared_loader(tmp_path):
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    save_hf_folder(vit, tmp_path / "encoder_hf")
    loaded, report = load_encoder(tmp_path / "encoder_hf")
    assert isinstance(loaded, CTFMViT) and not report.missing and not report.unexpected
    assert loaded.config == vit.config
    x = torch.rand(2, 1, 16, 32, 32)
    assert torch.equal(loaded.eval().embed(x), vit.embed(x))
    assert torch.equal(loaded(x)[-1], vit(x)[-1])


def test_vit_reads_like_the_encoder_and_takes_other_sizes():
    vit = tiny_vit().eval()
    maps = vit(torch.rand(1, 1, 16, 32, 32))
    assert len(maps) == 1 and maps[-1].shape == (1, 24, 2, 4, 4) and vit.embedding_dim == 24
    assert vit.feature_maps(torch.rand(1, 1, 8, 16, 16))[-1].shape == (1, 24, 1, 2, 2)  # resampled position embeddings
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vit(torch.rand(1, 1, 12, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit(img_size=(20, 32, 32))
