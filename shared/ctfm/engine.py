"""Run plumbing for the bundles' ignite engines: crash-safe checkpoints, resume, distributed setup, export.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a truncated
file that ``CheckpointLoader`` then fails on, and it needs the checkpoint's path up front. Here checkpoints are
written to a temporary file and renamed, and a run resumes from the newest complete one by itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, ProgressBar
from torch import nn

from ctfm.checkpoint import save_hf_folder, save_state_dict
from ctfm.encoder import CTFMEncoder
from ctfm.files import atomic_path

logger = logging.getLogger("ctfm.engine")
_CHECKPOINT_NAME = re.compile(r"^checkpoint_iteration=(\d+)\.pt$")


def checkpoint_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_iteration={iteration}.pt"


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest iteration in ``folder``, or ``None``."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_iteration=*.pt") if (m := _CHECKPOINT_NAME.match(p.name))]
    return max(found)[1] if found else None


class AtomicCheckpointSaver:
    """Save ``{name: obj.state_dict()}`` plus the engine's own state (``"trainer"``) every ``interval``
    iterations and at the end, atomically.

    Keeps the newest ``n_saved`` files ``checkpoint_iteration=N.pt``. Only rank 0 writes. The engine is taken
    from ``attach`` so that a config needs no reference from a handler back to its trainer.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, object], interval: int = 100, n_saved: int = 2):
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.n_saved = int(n_saved)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        target = checkpoint_path(self.save_dir, engine.state.iteration)
        if target.exists():
            return
        state = {name: _unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
        old = sorted(self.save_dir.glob("checkpoint_iteration=*.pt"), key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))
        for path in old[: -self.n_saved]:
            path.unlink(missing_ok=True)
        logger.info("saved %s", target)


class ResumeFromLatest:
    """At start, load the newest checkpoint in ``save_dir`` (if any) into ``load_dict`` and the engine itself."""

    def __init__(self, save_dir: str | os.PathLike, load_dict: Mapping[str, object]):
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir)
        if path is None:
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs
        to_load = {k: _unwrap(v) for k, v in self.load_dict.items()} | {"trainer": engine}
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at iteration %d", path, engine.state.iteration)


class SaveNetworkWeights:
    """When the engine completes, write the network's plain state dict to ``path`` atomically (rank 0 only)."""

    def __init__(self, network: nn.Module, path: str | os.PathLike):
        self.network = network
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        self.save(_unwrap(self.network))

    def save(self, network: nn.Module) -> None:
        save_state_dict(network, self.path)
        logger.info("saved network weights to %s", self.path)


class ExportEncoder(SaveNetworkWeights):
    """On completion, write the encoder as a plain state dict and as a Hugging Face model folder (rank 0).

    Writes ``<output_dir>/model.pt`` and ``<output_dir>/encoder_hf/{config.json, model.safetensors}``.
    """

    def __init__(self, encoder: CTFMEncoder, output_dir: str | os.PathLike):
        super().__init__(encoder, Path(output_dir) / "model.pt")
        self.output_dir = Path(output_dir)

    def save(self, encoder: CTFMEncoder) -> None:
        super().save(encoder)
        save_hf_folder(encoder, self.output_dir / "encoder_hf")


def loss_of(output: dict | list[dict]) -> float:
    """The loss of an engine's output, whether decollated (a list of dicts) or not (a dict)."""
    loss = (output[0] if isinstance(output, list) else output)["loss"]
    return loss.detach().item() if isinstance(loss, torch.Tensor) else float(loss)


class LossProgressBar(ProgressBar):
    """ignite's progress bar showing the loss, attachable as a MONAI ``train_handlers`` entry."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine, output_transform=lambda output: {"loss": loss_of(output)})


def init_distributed() -> torch.device:
    """Join the ``torchrun`` process group (NCCL with CUDA, gloo on CPU) and return this rank's device."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def distributed_network(network: nn.Module, device: torch.device) -> nn.Module:
    """Wrap for DDP; BatchNorm becomes SyncBatchNorm on CUDA only (torch refuses it for CPU modules)."""
    network = network.to(device)
    if device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        return nn.parallel.DistributedDataParallel(network, device_ids=[device])
    return nn.parallel.DistributedDataParallel(network)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _unwrap(obj):
    return obj.module if isinstance(obj, nn.parallel.DistributedDataParallel) else obj
