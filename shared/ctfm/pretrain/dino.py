"""FM-CT's pre-training recipe in 3D: DINO self-distillation with iBOT-style masked image modelling (MIM).

Per scan, two global crops (FM-CT: 112^3 resized to 96^3) and ``L`` local crops (FM-CT: 64^3), each with CT-FM's
view augmentations (:func:`ctfm.pretrain.simclr.view_augmentations`); random block masks on the patch grid of each
global crop. The student (:class:`ctfm.networks.DINOModel`) sees the masked global crops and the local crops, the
teacher the unmasked global crops. These pieces plug into MONAI's ``SupervisedTrainer``:

- :class:`MultiCropViewsd` makes the crops and masks (:func:`block_mask`);
- :func:`prepare_multicrop` batches them for the network;
- :class:`DINOLoss` scores them: DINO's cross-entropy between the teacher's centred, sharpened distribution on
  each global crop and the student's on every *other* crop, plus ``mim_weight`` times iBOT's patch-level
  cross-entropy, on the *masked* positions only, between the teacher's and the student's patch distributions of
  the same global crop; it keeps the teacher centres (EMA of the teacher's logits) as buffers;
- :class:`DINOTeacherUpdate`, an ignite handler, sets the teacher temperature (linear warm-up) before each step,
  updates the teacher as an EMA of the student (momentum on a cosine schedule to 1) after it, and puts the loss
  terms and collapse watches into the engine's output, which :func:`loss_terms` reads for TensorBoard;
- :class:`DINOStudentUpdate`, an ignite handler, does the rest of DINO's optimisation step: the weight decay on a
  cosine schedule (0.04 -> 0.4) over the parameters :func:`param_groups` regularises (not biases or norms),
  gradient clipping (global norm 3.0) and the head's last layer frozen for the first steps.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.transforms import Compose, MapTransform, Randomizable, RandSpatialCrop, Resize
from monai.utils import convert_to_tensor
from torch import nn

from ctfm.engine import loss_of
from ctfm.pretrain.ema import cosine_schedule, ema_update_, linear_warmup
from ctfm.pretrain.simclr import view_augmentations

__all__ = [
    "GLOBAL_KEY",
    "LOCAL_KEY",
    "MASK_KEY",
    "SCHEDULED_WEIGHT_DECAY",
    "DINOLoss",
    "DINOStudentUpdate",
    "DINOTeacherUpdate",
    "MultiCropViewsd",
    "block_mask",
    "loss_terms",
    "param_groups",
    "prepare_multicrop",
]

GLOBAL_KEY, LOCAL_KEY, MASK_KEY = "global_views", "local_views", "masks"
#: Global crops per scan (DINO, FM-CT).
NUM_GLOBAL = 2


def block_mask(grid: Sequence[int], ratio: float, rng: np.random.RandomState, max_attempts: int = 100) -> np.ndarray:
    """A bool mask of shape ``grid`` made of random boxes, covering ``round(ratio * prod(grid))`` positions at most.

    Boxes (iBOT's blockwise masking in 3D) have random sides, shrunk until the box is no larger than what is still
    to be masked, at random places; overlapping boxes count once, so after ``max_attempts`` boxes the mask may
    cover a little less than the target. ``ratio`` 0 gives an empty mask.
    """
    grid = tuple(int(g) for g in grid)
    mask = np.zeros(grid, dtype=bool)
    target = int(round(float(ratio) * mask.size))
    for _ in range(max_attempts):
        remaining = target - int(mask.sum())
        if remaining <= 0:
            break
        sides = [int(rng.randint(1, g + 1)) for g in grid]
        while math.prod(sides) > remaining:
            sides[int(np.argmax(sides))] -= 1
        starts = [int(rng.randint(0, g - s + 1)) for g, s in zip(grid, sides)]
        mask[tuple(slice(a, a + s) for a, s in zip(starts, sides))] = True
    return mask


class MultiCropViewsd(Randomizable, MapTransform):
    """Cut the multi-crop views (and MIM masks) of one preprocessed scan.

    Args:
        keys: the image key; input ``d[key]`` ``(C, S, P, L)`` in [0, 1], at least ``global_crop_size`` and
            ``local_crop_size`` on every axis (pad first). It is dropped from the output.
        global_crop_size, global_size: a global crop's size in voxels, and the size it is resized to (FM-CT:
            112^3 -> 96^3).
        local_crop_size, local_size: the same for local crops (FM-CT: 64^3; ``local_size`` None: not resized).
        num_local_crops: ``L`` (0 allowed).
        mask_grid: the patch grid of a global crop as the encoder sees it (``global_size`` / the deepest map's
            stride; e.g. 16 for the CNN encoder, the patch size for the ViT); None: no masks (no MIM).
        mask_ratio: each masked crop's ratio is drawn uniformly from this range (iBOT: 0.1..0.5).
        mask_probability: the chance a global crop is masked at all (iBOT: 0.5).

    Output: ``d["global_views"]`` ``(2, C, *global_size)``, ``d["local_views"]`` ``(L, C, *local_size)`` (when
    ``L > 0``), ``d["masks"]`` ``(2, *mask_grid)`` bool (when ``mask_grid``); float32 views. Each crop is placed
    at random in the scan, then gets :func:`~ctfm.pretrain.simclr.view_augmentations`.
    """

    def __init__(
        self,
        keys: str = "image",
        global_crop_size: Sequence[int] = (112, 112, 112),
        global_size: Sequence[int] | None = (96, 96, 96),
        local_crop_size: Sequence[int] = (64, 64, 64),
        local_size: Sequence[int] | None = None,
        num_local_crops: int = 2,
        mask_grid: Sequence[int] | None = None,
        mask_ratio: Sequence[float] = (0.1, 0.5),
        mask_probability: float = 0.5,
    ):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("MultiCropViewsd takes one image key")
        self.global_crop_size = tuple(int(s) for s in global_crop_size)
        self.global_size = tuple(int(s) for s in (global_size or global_crop_size))
        self.local_crop_size = tuple(int(s) for s in local_crop_size)
        self.local_size = tuple(int(s) for s in (local_size or local_crop_size))
        self.num_local_crops = int(num_local_crops)
        self.mask_grid = None if mask_grid is None else tuple(int(g) for g in mask_grid)
        if self.mask_grid is not None and any(s % g for s, g in zip(self.global_size, self.mask_grid)):
            raise ValueError(f"mask grid {self.mask_grid} does not divide the global size {self.global_size}")
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mask_probability = float(mask_probability)
        self.global_view = self._pipeline(self.global_crop_size, self.global_size)
        self.local_view = self._pipeline(self.local_crop_size, self.local_size)

    @staticmethod
    def _pipeline(crop_size: tuple[int, ...], size: tuple[int, ...]) -> Compose:
        steps = [RandSpatialCrop(crop_size, random_size=False)]
        if size != crop_size:
            steps.append(Resize(size, mode="trilinear"))
        return Compose([*steps, *view_augmentations()])

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.global_view.set_random_state(state=self.R)
        self.local_view.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:
        pass

    def _mask(self) -> np.ndarray:
        masked = self.R.uniform() < self.mask_probability
        ratio = self.R.uniform(*self.mask_ratio) if masked else 0.0
        return block_mask(self.mask_grid, ratio, self.R)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = convert_to_tensor(d.pop(self.keys[0]), dtype=torch.float32, track_meta=False)
        needed = [("global", self.global_crop_size)] + ([("local", self.local_crop_size)] if self.num_local_crops else [])
        for kind, crop in needed:
            if any(n < s for n, s in zip(image.shape[1:], crop)):
                raise ValueError(f"scan of shape {tuple(image.shape)} is smaller than the {kind} crop {crop}; pad it first")

        def views(pipeline: Compose, n: int) -> torch.Tensor:
            return torch.stack([convert_to_tensor(pipeline(image), dtype=torch.float32, track_meta=False) for _ in range(n)])

        d[GLOBAL_KEY] = views(self.global_view, NUM_GLOBAL)
        if self.num_local_crops:
            d[LOCAL_KEY] = views(self.local_view, self.num_local_crops)
        if self.mask_grid is not None:
            d[MASK_KEY] = torch.from_numpy(np.stack([self._mask() for _ in range(NUM_GLOBAL)]))
        return d


def _crop_major(x: torch.Tensor) -> torch.Tensor:
    """``(B, n, ...)`` -> ``(n * B, ...)``: all scans' first crop, then all second ones, ..."""
    return x.transpose(0, 1).flatten(0, 1)


def prepare_multicrop(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for ``SupervisedTrainer``: ``(global (2B, C, *G), None, (local (LB, C, *L) or None,
    masks (2B, *grid) or None), {})``, crop-major, which :class:`~ctfm.networks.DINOModel` and :class:`DINOLoss`
    rely on. There is no target: the loss is self-supervised."""

    def move(key: str) -> torch.Tensor | None:
        if key not in batchdata:
            return None
        return _crop_major(torch.as_tensor(batchdata[key])).to(device=device, non_blocking=non_blocking, **kwargs)

    masks = move(MASK_KEY)
    return move(GLOBAL_KEY), None, (move(LOCAL_KEY), None if masks is None else masks.bool()), {}


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over this rank's rows and, under DDP, over every rank's: ``(n, K)`` -> ``(1, K)``."""
    total = x.sum(0, keepdim=True)
    count = torch.tensor([float(x.shape[0])], device=x.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count


class DINOLoss(nn.Module):
    """DINO + iBOT-style MIM loss on :class:`~ctfm.networks.DINOModel`'s output (see the module docstring).

    Args:
        num_prototypes: ``K`` (the head's output).
        student_temperature: the student's softmax temperature (0.1).
        teacher_temperature: the teacher's (0.04 at the end of warm-up); :class:`DINOTeacherUpdate` sets it per step.
        center_momentum: EMA momentum of the teacher centres (DINO: 0.9).
        mim_weight: weight of the patch-level loss (0: DINO alone; the model then gets no masks either).

    ``forward(outputs) -> loss`` (a scalar): ``dino + mim_weight * mim``. ``dino`` averages, over scans and over
    every pair (teacher global crop ``i``, student crop ``v != i``), ``sum_k -p_t[k] log p_s[k]``; ``mim`` averages,
    per masked global crop, that cross-entropy between the teacher's and the student's patch distributions over
    its masked positions, then over the crops that have any (crops without a mask add nothing). After scoring, the
    centres move towards the batch means of the teacher's logits (all ranks under DDP). :attr:`terms` holds the last
    step's ``dino_loss``, ``mim_loss``, ``teacher_entropy`` (mean entropy of the teacher's distribution, nats; 0 =
    one-hot, ``log K`` = uniform), ``teacher_marginal_entropy`` (entropy of the batch-mean distribution: low when all
    crops fall on a few prototypes), ``embedding_std`` (std over the batch of the teacher's L2-normalised
    embeddings, mean over dimensions; 0 = collapse, about ``1 / sqrt(E)`` when spread), ``masked_fraction``.
    """

    def __init__(self, num_prototypes: int, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 center_momentum: float = 0.9, mim_weight: float = 1.0):
        super().__init__()
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.center_momentum = float(center_momentum)
        self.mim_weight = float(mim_weight)
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.register_buffer("patch_center", torch.zeros(1, num_prototypes))
        self.terms: dict[str, float] = {}

    def teacher_probabilities(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """Centred and sharpened: ``softmax((logits - center) / teacher_temperature)`` over the last axis."""
        return F.softmax((logits.float() - center) / self.teacher_temperature, dim=-1)

    def forward(self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
        student, teacher = outputs["student"].float(), outputs["teacher"].float()
        if teacher.shape[0] % NUM_GLOBAL or student.shape[0] % (teacher.shape[0] // NUM_GLOBAL):
            raise ValueError(f"teacher rows {teacher.shape[0]} and student rows {student.shape[0]} do not fit "
                             f"{NUM_GLOBAL} global crops per scan")
        b = teacher.shape[0] // NUM_GLOBAL
        t = self.teacher_probabilities(teacher, self.center).chunk(NUM_GLOBAL)
        log_s = F.log_softmax(student / self.student_temperature, dim=-1).chunk(student.shape[0] // b)
        pairs = [(-ti * sv).sum(-1).mean() for i, ti in enumerate(t) for v, sv in enumerate(log_s) if v != i]
        dino = torch.stack(pairs).mean()
        mim = dino.new_zeros(())
        masked_fraction = 0.0
        with_mim = self.mim_weight > 0 and "masks" in outputs
        if with_mim:
            masks = outputs["masks"].float()  # (2B, N)
            tp = self.teacher_probabilities(outputs["teacher_patches"], self.patch_center)  # (2B, N, K)
            log_sp = F.log_softmax(outputs["student_patches"].float() / self.student_temperature, dim=-1)
            per_position = (-tp * log_sp).sum(-1)  # (2B, N)
            per_crop = (per_position * masks).sum(-1) / masks.sum(-1).clamp(min=1.0)
            has_mask = masks.sum(-1) > 0
            if bool(has_mask.any()):
                mim = per_crop[has_mask].mean()
            masked_fraction = float(masks.mean())
        loss = dino + self.mim_weight * mim
        with torch.no_grad():
            p = torch.cat(t)
            entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
            marginal = p.mean(0)
            marginal_entropy = float(-(marginal * torch.log(marginal.clamp_min(1e-12))).sum())
            z = F.normalize(outputs["teacher_embedding"].float(), dim=1)
            spread = float(z.std(0).mean()) if z.shape[0] > 1 else float("nan")
            self.center.mul_(self.center_momentum).add_(_all_mean(teacher), alpha=1.0 - self.center_momentum)
            if with_mim:
                flat = outputs["teacher_patches"].float().flatten(0, 1)
                self.patch_center.mul_(self.center_momentum).add_(_all_mean(flat), alpha=1.0 - self.center_momentum)
        self.terms = {"dino_loss": float(dino.detach()), "mim_loss": float(mim.detach()), "teacher_entropy": entropy,
                      "teacher_marginal_entropy": marginal_entropy, "embedding_std": spread, "masked_fraction": masked_fraction}
        return loss


class DINOTeacherUpdate:
    """The teacher's schedules, as an ignite handler (attach before the checkpoint saver, so that a checkpoint
    holds the teacher of its step).

    Args:
        model: the (unwrapped) :class:`~ctfm.networks.DINOModel`.
        loss: its :class:`DINOLoss`, whose ``teacher_temperature`` is set before each step.
        total_iterations: the run's length in steps; the momentum reaches ``momentum_end`` there.
        momentum, momentum_end: the EMA momentum's cosine schedule (FM-CT: 0.994 -> 1.0).
        teacher_temperature, warmup_teacher_temperature, warmup_iterations: the teacher temperature rises linearly
            from ``warmup_teacher_temperature`` to ``teacher_temperature`` over ``warmup_iterations`` steps.

    Step ``n`` (1-based, ignite's ``iteration``) trains with temperature ``linear_warmup(n - 1, ...)`` and then moves
    the teacher with momentum ``cosine_schedule(n - 1, total_iterations, ...)``; both are functions of the step
    only, so a resumed run continues them exactly. After each step ``engine.state.output["terms"]`` holds the
    loss's :attr:`~DINOLoss.terms` and the ``momentum`` and ``teacher_temperature`` used.
    """

    def __init__(self, model: nn.Module, loss: DINOLoss, total_iterations: int, momentum: float = 0.994, momentum_end: float = 1.0,
                 teacher_temperature: float = 0.04, warmup_teacher_temperature: float = 0.02, warmup_iterations: int = 0):
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.loss = loss
        self.total_iterations = int(total_iterations)
        self.momentum, self.momentum_end = float(momentum), float(momentum_end)
        self.teacher_temperature, self.warmup_teacher_temperature = float(teacher_temperature), float(warmup_teacher_temperature)
        self.warmup_iterations = int(warmup_iterations)

    def temperature_at(self, step: int) -> float:
        return linear_warmup(step, self.warmup_iterations, self.warmup_teacher_temperature, self.teacher_temperature)

    def momentum_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_iterations, self.momentum, self.momentum_end)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.before_step)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.after_step)

    def before_step(self, engine: Engine) -> None:
        self.loss.teacher_temperature = self.temperature_at(engine.state.iteration - 1)

    def after_step(self, engine: Engine) -> None:
        m = self.momentum_at(engine.state.iteration - 1)
        ema_update_(self.model.teacher, self.model.student, m)
        _add_terms(engine, {**self.loss.terms, "momentum": m, "teacher_temperature": self.loss.teacher_temperature})


#: The key of an optimiser group whose weight decay :class:`DINOStudentUpdate` schedules (kept in its state dict).
SCHEDULED_WEIGHT_DECAY = "scheduled_weight_decay"


def param_groups(module: nn.Module) -> list[dict]:
    """``module``'s trainable parameters as the optimiser's two groups (DINO's): ``[{"params": weights,
    "scheduled_weight_decay": True}, {"params": biases and norms, "weight_decay": 0.0}]``; a parameter of one
    dimension or named ``*.bias`` is not regularised. :class:`DINOStudentUpdate` schedules the first group's weight
    decay."""
    regularised, plain = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (plain if name.endswith(".bias") or p.ndim <= 1 else regularised).append(p)
    return [{"params": regularised, SCHEDULED_WEIGHT_DECAY: True}, {"params": plain, "weight_decay": 0.0}]


class DINOStudentUpdate:
    """DINO's optimisation step around MONAI's ``SupervisedTrainer``'s, as an ignite handler.

    Args:
        optimizer: the student's optimiser, its groups from :func:`param_groups`.
        model: the (unwrapped) :class:`~ctfm.networks.DINOModel`.
        total_iterations: the run's length in steps; the weight decay reaches ``weight_decay_end`` there.
        weight_decay, weight_decay_end: the cosine schedule of the weight decay of the groups :func:`param_groups`
            marks (DINO, FM-CT: 0.04 -> 0.4); with no group marked (a plain parameter list), of every group.
        clip_grad: the student's gradients are scaled to this global L2 norm at most (DINOv2: 3.0; 0: no clipping).
        freeze_last_layer_iterations: steps at the start during which the head's last layer is not updated (DINO:
            the first epoch; its gradients are dropped, so the optimiser leaves it alone).

    Before each step the weight decay is set (``cosine_schedule(n - 1, ...)``); after the backward pass, and before
    the optimiser steps (MONAI's ``BACKWARD_COMPLETED``; gradients unscaled first under AMP), gradients are clipped
    and the last layer's dropped while frozen; with the trainer's gradient accumulation, only on the steps the
    optimiser takes. All are functions of the step, so a resumed run continues them exactly.
    ``engine.state.output["terms"]`` gets ``grad_norm`` (the norm before clipping), ``weight_decay`` (as set on the
    scheduled groups) and ``learning_rate``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, total_iterations: int, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, clip_grad: float = 3.0, freeze_last_layer_iterations: int = 0):
        self.optimizer = optimizer
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.total_iterations = int(total_iterations)
        self.weight_decay, self.weight_decay_end = float(weight_decay), float(weight_decay_end)
        self.clip_grad = float(clip_grad)
        self.freeze_last_layer_iterations = int(freeze_last_layer_iterations)
        self.grad_norm = self.learning_rate = self.weight_decay_set = float("nan")

    def weight_decay_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_iterations, self.weight_decay, self.weight_decay_end)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.before_step)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.after_backward)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.after_step)

    def before_step(self, engine: Engine) -> None:
        # looked up every step: loading a checkpoint's optimiser state replaces the group dicts (the mark is kept)
        groups = self.optimizer.param_groups
        scheduled = [g for g in groups if g.get(SCHEDULED_WEIGHT_DECAY)] or groups
        self.weight_decay_set = self.weight_decay_at(engine.state.iteration - 1)
        for group in scheduled:
            group["weight_decay"] = self.weight_decay_set
        self.learning_rate = float(groups[0]["lr"])  # this step's, before the scheduler moves it

    def after_backward(self, engine: Engine) -> None:
        if not _optimiser_steps(engine):
            return  # an accumulation step: the optimiser does not step, the gradients are not complete
        student = self.model.student
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            scaler.unscale_(self.optimizer)
        grads = [p for p in student.parameters() if p.grad is not None]
        if grads:  # an infinite bound measures the norm without clipping
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, self.clip_grad if self.clip_grad > 0 else math.inf))
        if engine.state.iteration <= self.freeze_last_layer_iterations:
            for p in student.head.last_layer.parameters():
                p.grad = None

    def after_step(self, engine: Engine) -> None:
        _add_terms(engine, {"grad_norm": self.grad_norm, "weight_decay": self.weight_decay_set, "learning_rate": self.learning_rate})


def _optimiser_steps(engine: Engine) -> bool:
    """Whether MONAI's ``SupervisedTrainer`` steps the optimiser this iteration: every one, or with
    ``accumulation_steps`` ``a`` every ``a``-th of the epoch and its last."""
    acc = int(getattr(engine, "accumulation_steps", 1))
    if acc <= 1:
        return True
    epoch_length = engine.state.epoch_length
    local = (engine.state.iteration - 1) % epoch_length if epoch_length else engine.state.iteration - 1
    return (local + 1) % acc == 0 or (epoch_length is not None and local + 1 == epoch_length)


def _add_terms(engine: Engine, terms: Mapping[str, float]) -> None:
    """Merge ``terms`` into ``engine.state.output["terms"]`` (what :func:`loss_terms` logs)."""
    output = engine.state.output
    if isinstance(output, dict):
        output["terms"] = {**output.get("terms", {}), **terms}


def loss_terms(output: dict | list[dict]) -> dict[str, float]:
    """``{"train_loss": total, **terms}`` of a DINO trainer's output, for ``TensorBoardStatsHandler``."""
    first = output[0] if isinstance(output, list) else output
    return {"train_loss": loss_of(output), **first.get("terms", {})}
