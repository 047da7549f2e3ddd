"""Run plumbing for the bundles' ignite engines: crash-safe checkpoints, resume, distributed setup, export.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed mid-write leaves a truncated
file that ``CheckpointLoader`` then fails on, and it needs the checkpoint's path up front. Here checkpoints are
written to a temporary file, flushed to disk and renamed; a run resumes by itself from the newest checkpoint
that loads, removes the temporaries a killed run left behind, and continues with the random states the
interrupted run had, so that a resumed run on CPU ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, ProgressBar
from torch import nn

from ctfm.errors import CTFMError
from ctfm.files import atomic_path, remove_stale_temporaries

__all__ = [
    "DEFAULT_DDP_TIMEOUT_S",
    "AtomicCheckpointSaver",
    "ExportEncoder",
    "LossProgressBar",
    "ResumeFromLatest",
    "SaveBestNetworkWeights",
    "SaveNetworkWeights",
    "checkpoint_path",
    "checkpoints",
    "ddp_timeout",
    "distributed_network",
    "init_distributed",
    "is_main_process",
    "latest_checkpoint",
    "loss_of",
    "random_states_of",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger("ctfm.engine")
_CHECKPOINT_NAME = re.compile(r"^checkpoint_iteration=(\d+)\.pt$")

#: Seconds a collective (and the rendezvous) may wait for a peer before it raises, unless told otherwise.
DEFAULT_DDP_TIMEOUT_S = 300.0


def checkpoint_path(folder: str | os.PathLike, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_iteration={iteration}.pt"


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint_iteration=N.pt`` files in ``folder``, oldest (lowest ``N``) first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint_iteration=*.pt") if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest iteration in ``folder``, or ``None``."""
    found = checkpoints(folder)
    return found[-1] if found else None


# --- random states -------------------------------------------------------------------------------------------

_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, np.ndarray, nn.Module, type,
           types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, torch.Generator)


def random_states_of(obj: object, max_depth: int = 16) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` reachable from ``obj`` (e.g. a MONAI ``Compose``), each once.

    Walks lists, tuples, mappings and the attributes of objects (so nested ``Compose``\\ s and transforms that
    hold sub-transforms are covered), depth first in attribute order, which is the same for two pipelines built
    alike. MONAI's ``Randomizable`` transforms draw from their ``R``; a generator shared by several transforms
    (``ctfm.pretrain.IntraSampleViewsd`` hands its ``R`` to its crops and views) is listed once.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(o: object, depth: int) -> None:
        if depth > max_depth or id(o) in seen:
            return
        if isinstance(o, np.random.RandomState):
            seen.add(id(o))
            found.append(o)
            return
        if isinstance(o, _LEAVES):
            return
        seen.add(id(o))
        if isinstance(o, Mapping):
            items: Iterable = o.values()
        elif isinstance(o, (list, tuple)):
            items = o
        elif hasattr(o, "__dict__"):
            items = [v for k, v in vars(o).items() if not k.startswith("__")]
            shared = getattr(type(o), "R", None)  # MONAI's class-wide R, used until set_random_state is called
            if "R" not in vars(o) and isinstance(shared, np.random.RandomState):
                items.insert(0, shared)
        else:
            return
        for item in items:
            visit(item, depth + 1)

    visit(obj, 0)
    return found


def _numpy_state(state: tuple) -> dict:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(state: Mapping) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


def rng_state(randomizables: Sequence[np.random.RandomState] = (), generators: Sequence[torch.Generator] = ()) -> dict:
    """The random states of this process, in a form ``torch.load(weights_only=True)`` reads back.

    ``{"torch": uint8 tensor, "cuda": [uint8 tensor of the current device] or [], "numpy": {...},
    "python": [version, [625 ints], gauss_next], "randomizables": [{...}, ...], "generators": [uint8 tensor]}``;
    a numpy ``RandomState`` is ``{"kind": "MT19937", "keys": int64 tensor (624,), "pos", "has_gauss",
    "cached_gaussian"}``. CUDA's state is taken only once CUDA is initialised (so no context is made here).
    """
    version, internal, gauss_next = random.getstate()
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": _numpy_state(np.random.get_state()),
        "python": [version, list(internal), gauss_next],
        "randomizables": [_numpy_state(r.get_state()) for r in randomizables],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: Mapping, randomizables: Sequence[np.random.RandomState] = (), generators: Sequence[torch.Generator] = ()) -> None:
    """Restore what :func:`rng_state` returned; ``randomizables``/``generators`` are matched by position.

    A count that differs from the saved one (another pipeline) leaves those generators as they are, with a
    warning.
    """
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    np.random.set_state(_numpy_tuple(state["numpy"]))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss_next))
    for kind, saved, current in (("transform", state.get("randomizables", []), randomizables),
                                 ("DataLoader", state.get("generators", []), generators)):
        if len(saved) != len(current):
            logger.warning("checkpoint holds %d %s random states, this run has %d: those left as they are",
                           len(saved), kind, len(current))
            continue
        for s, r in zip(saved, current):
            if kind == "transform":
                r.set_state(_numpy_tuple(s))
            else:
                r.set_state(s)


def _loader_generators(loader: object) -> list[torch.Generator]:
    """The ``torch.Generator``\\ s a DataLoader draws its order and worker seeds from (its own and its sampler's)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


class _DataStream:
    """The random states of one engine's data stream (one per engine, shared by saver and resume handler).

    It replaces ``engine.state.dataloader`` by a :class:`_TrackedLoader`, which takes the random states just
    before each ``iter(dataloader)`` and counts the batches drawn from that iterator since.
    """

    def __init__(self, transforms: object | None = None):
        self.transforms = transforms
        self.randomizables: list[np.random.RandomState] = []
        self.generators: list[torch.Generator] = []
        self.iterator_state: dict | None = None  # rng_state() just before the current iterator was made
        self.drawn = 0  # batches drawn from the current iterator
        self.current: object | None = None
        self.pending: tuple[dict, int, dict] | None = None  # (iterator_state, drawn, state at save) to replay

    @classmethod
    def of(cls, engine: Engine, transforms: object | None = None) -> _DataStream:
        stream = engine.__dict__.get("_ctfm_data_stream")
        if stream is None:
            stream = engine.__dict__["_ctfm_data_stream"] = cls(transforms)
        if stream.transforms is None and transforms is not None:
            stream.transforms = transforms
        loader = engine.state.dataloader
        if loader is not None and not isinstance(loader, _TrackedLoader):
            transforms = stream.transforms if stream.transforms is not None else getattr(getattr(loader, "dataset", None), "transform", None)
            stream.randomizables = random_states_of(transforms) if transforms is not None else []
            stream.generators = _loader_generators(loader)
            engine.state.dataloader = _TrackedLoader(loader, stream)
        return stream

    def state(self) -> dict:
        return rng_state(self.randomizables, self.generators)

    def restore(self, state: Mapping) -> None:
        set_rng_state(state, self.randomizables, self.generators)

    def new_iterator(self, loader: object) -> Iterator:
        if self.pending is not None:
            return self._replay(loader, *self.pending)
        self.iterator_state = self.state()
        self.drawn = 0
        self.current = _CountingIterator(iter(loader), self)
        return self.current

    def _replay(self, loader: object, iterator_state: dict, drawn: int, saved: dict) -> Iterator:
        self.pending = None
        try:
            exhausted = drawn >= len(loader)  # type: ignore[arg-type]
        except TypeError:
            exhausted = False
        if exhausted and not self.generators:
            # the interrupted run's next fetch would only have found its iterator empty, which draws nothing
            # from a seeded generator: ignite makes the next iterator, from the states at the save
            self.restore(saved)
            self.iterator_state, self.drawn, self.current = iterator_state, drawn, None
            return iter(())
        self.restore(iterator_state)
        self.iterator_state, self.drawn = iterator_state, 0
        self.current = it = _CountingIterator(iter(loader), self)
        for _ in range(drawn):
            try:
                next(it)
            except StopIteration:
                break
        self.restore(saved)
        return it


class _CountingIterator:
    def __init__(self, it: Iterator, stream: _DataStream):
        self.it, self.stream = it, stream

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self):
        batch = next(self.it)
        if self.stream.current is self:
            self.stream.drawn += 1
        return batch


class _TrackedLoader:
    """A DataLoader seen through :class:`_DataStream`; every other attribute is the DataLoader's."""

    def __init__(self, loader: object, stream: _DataStream):
        self.__dict__["loader"] = loader
        self.__dict__["stream"] = stream

    def __iter__(self) -> Iterator:
        return self.stream.new_iterator(self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)


# --- handlers ------------------------------------------------------------------------------------------------


class AtomicCheckpointSaver:
    """Save ``{name: obj.state_dict()}`` plus the engine's own state (``"trainer"``) and the random states
    (``"rng"``) every ``interval`` iterations and at the end, atomically (flushed to disk, then renamed).

    Keeps the newest ``n_saved`` files ``checkpoint_iteration=N.pt``. Only rank 0 writes, and at start removes
    the temporaries of a write that was killed. The engine is taken from ``attach`` so that a config needs no
    reference from a handler back to its trainer.

    ``"rng"`` is ``{"now": rng_state(), "iterator": rng_state() just before the current DataLoader iterator
    was made, "batches_drawn": batches drawn from that iterator}`` (see :func:`rng_state` for the format;
    :class:`ResumeFromLatest` explains the use). ``transforms`` is the object whose ``RandomState``\\ s are
    saved (e.g. the training ``Compose``); by default the training DataLoader's ``dataset.transform``.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping[str, object], interval: int = 100, n_saved: int = 2,
                 transforms: object | None = None):
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.n_saved = int(n_saved)
        self.transforms = transforms

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def started(self, engine: Engine) -> None:
        _DataStream.of(engine, self.transforms)
        if is_main_process():
            remove_stale_temporaries(self.save_dir)

    def __call__(self, engine: Engine) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        target = checkpoint_path(self.save_dir, engine.state.iteration)
        if target.exists():
            return
        state = {name: _unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        stream = _DataStream.of(engine, self.transforms)
        state["rng"] = {"now": stream.state()}
        if stream.iterator_state is not None:
            state["rng"] |= {"iterator": stream.iterator_state, "batches_drawn": stream.drawn}
        with atomic_path(target) as tmp:
            torch.save(state, tmp)
        for path in checkpoints(self.save_dir)[: -self.n_saved]:
            path.unlink(missing_ok=True)
        logger.info("saved %s", target)


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    first = lines[0].strip().split(". ")[0].rstrip(".") if lines else ""  # torch's zip errors run on with advice
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class ResumeFromLatest:
    """At start, load the newest checkpoint in ``save_dir`` that loads into ``load_dict``, the engine and the
    random states.

    First (rank 0) the temporaries of killed writes are removed. A checkpoint that does not load (truncated,
    corrupt) is named in one warning and the previous one is tried; once one loads, the unreadable ones are
    renamed to ``<name>.unreadable`` (rank 0), so that they are not tried again and the run can write those
    iterations anew. If none loads, a one-line :class:`CTFMError` is raised (and nothing renamed) rather than
    training from scratch over a run that was meant to resume: move the files away to start afresh.

    Random states (``restore_rng``, saved by :class:`AtomicCheckpointSaver`): ignite resumes at iteration ``N``
    of an epoch by making a *new* DataLoader iterator and counting that epoch on from ``N % epoch_length``; it
    does not skip batches. So the rule implemented is: the random states taken just before the interrupted
    run's current iterator was made (torch, numpy, Python, the transforms' ``R``\\ s and the DataLoader's
    generator) are restored, the new iterator is made and the ``batches_drawn`` batches the interrupted run had
    already drawn from it are drawn again and dropped (their random transforms included), and then the states
    at the save are restored (they include what the training steps drew, e.g. dropout). A run resumed on CPU
    then sees the same batches and draws the same numbers as the uninterrupted one, and ends with bit-identical
    weights (tested with one thread). When the saved iterator was used up and the DataLoader has no seeded
    ``generator``, nothing is re-drawn. Not exact: ``persistent_workers=True`` with ``num_workers > 0`` (the
    workers' own transform states live in the worker processes and are not saved; without persistent workers
    they are re-seeded from torch's state at each iterator and so are reproduced), and under DDP, where only
    rank 0 saves and every rank resumes with rank 0's states (the bundles seed all ranks alike). Checkpoints
    without ``"rng"`` resume without restoring random states. Re-drawing costs the loading time of at most the
    batches of one DataLoader pass (none when checkpoints fall on pass boundaries, as in the bundles).
    ``transforms``: as for :class:`AtomicCheckpointSaver` (default: the DataLoader's ``dataset.transform``).
    """

    def __init__(self, save_dir: str | os.PathLike, load_dict: Mapping[str, object], transforms: object | None = None,
                 restore_rng: bool = True):
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.transforms = transforms
        self.restore_rng = bool(restore_rng)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def load_newest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads and its contents, or ``None`` if there is none (see the class)."""
        found = checkpoints(self.save_dir)[::-1]
        reasons: list[str] = []
        for i, path in enumerate(found):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(checkpoint, Mapping) or "trainer" not in checkpoint:
                    raise ValueError("no 'trainer' entry")
            except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, fall back
                reasons.append(_reason(exc))
                previous = found[i + 1] if i + 1 < len(found) else "nothing"
                logger.warning("%s: unreadable checkpoint (%s); falling back to %s", path, reasons[-1], previous)
                continue
            if is_main_process():  # set the unreadable ones aside only once one loads (else the next start is fresh)
                for bad in found[:i]:
                    try:
                        os.replace(bad, bad.with_name(bad.name + ".unreadable"))
                    except OSError:
                        pass
            return path, dict(checkpoint)
        if found:
            raise CTFMError(f"{self.save_dir}: none of its {len(found)} checkpoints loads (newest {found[0].name}: {reasons[0]}); "
                            "move them away to train from scratch")
        return None

    def __call__(self, engine: Engine) -> None:
        stream = _DataStream.of(engine, self.transforms)
        if is_main_process():
            remove_stale_temporaries(self.save_dir)
        loaded = self.load_newest()
        if loaded is None:
            return
        path, checkpoint = loaded
        max_epochs = engine.state.max_epochs
        to_load = {k: _unwrap(v) for k, v in self.load_dict.items()} | {"trainer": engine}
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        engine.state.max_epochs = max_epochs
        rng = checkpoint.get("rng")
        if self.restore_rng and rng is not None:
            stream.restore(rng["now"])
            if "iterator" in rng and isinstance(engine.state.dataloader, _TrackedLoader):
                stream.pending = (rng["iterator"], int(rng["batches_drawn"]), rng["now"])
        logger.info("resumed from %s at iteration %d%s", path, engine.state.iteration,
                    "" if rng is not None or not self.restore_rng else " (no random states in it)")


class SaveNetworkWeights:
    """When the engine completes, write the network's plain state dict to ``path`` atomically (rank 0 only).

    A ``path`` that holds a bundle's shipped weights (their sha256 is in :data:`ctfm.weights.WEIGHTS`) is refused
    when the run starts, before any training: a run must not replace what the bundle ships.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike):
        self.network = network
        self.path = Path(path)

    def targets(self) -> list[Path]:
        """The files and folders this handler writes."""
        return [self.path]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.refuse_shipped_targets)
        engine.add_event_handler(Events.COMPLETED, self)

    def refuse_shipped_targets(self, engine: Engine | None = None) -> None:
        from ctfm.weights import resolve

        for target in self.targets():
            shipped = sorted(resolve(target)[1])
            if shipped:
                raise CTFMError(
                    f"{shipped[0]}: the bundle's shipped weights would be replaced by this training run; "
                    "train into another folder (--bundle_root RUN_DIR)"
                )

    def __call__(self, engine: Engine | None = None) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        self.save(_unwrap(self.network))

    def save(self, network: nn.Module) -> None:
        from ctfm.checkpoint import (
            save_state_dict,  # here, so that the run plumbing imports without the model code
        )

        save_state_dict(network, self.path)
        logger.info("saved network weights to %s", self.path)


class SaveBestNetworkWeights(SaveNetworkWeights):
    """Write the network's state dict to ``path`` each time ``validator``'s key metric reaches a new best (higher
    is better), atomically, rank 0 only; a run whose validation never gave a finite metric writes it when the
    trainer completes, and says so.

    The best value goes with the weights, in ``<path>.best.json`` (written after them): a run resumed from a
    checkpoint (the trainer starts at a non-zero iteration) takes it as the best so far, so weights saved after the
    last checkpoint are not replaced by worse ones. Attach to the trainer; shipped targets are refused when the
    trainer starts, as :class:`SaveNetworkWeights`.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike, validator: Engine):
        super().__init__(network, path)
        self.validator = validator
        self.best: float | None = None
        self.record = self.path.with_name(self.path.name + ".best.json")

    def targets(self) -> list[Path]:
        return [self.path, self.record]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.refuse_shipped_targets)
        engine.add_event_handler(Events.STARTED, self.on_started)
        self.validator.add_event_handler(Events.COMPLETED, self.on_validation)
        engine.add_event_handler(Events.COMPLETED, self.on_completed)

    def on_started(self, engine: Engine) -> None:
        self.best = None
        if engine.state.iteration > 0 and self.record.is_file() and self.path.is_file():
            try:
                self.best = float(json.loads(self.record.read_text())["value"])
                logger.info("resumed: best %s so far %.4f (%s)", self.record, self.best, self.path)
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: unreadable; the first validation of this run sets the best", self.record)

    def on_validation(self, validator: Engine) -> None:
        name = getattr(validator.state, "key_metric_name", None)
        value = validator.state.metrics.get(name) if name else None
        if value is None or not np.isfinite(value):
            logger.warning("validation %s is %s: no weights saved for it", name, value)
            return
        if self.best is not None and value <= self.best:
            return
        self.best = float(value)
        logger.info("new best %s %.4f", name, self.best)
        self(validator)
        if not (dist.is_initialized() and dist.get_rank() != 0):
            with atomic_path(self.record) as tmp:
                tmp.write_text(json.dumps({"metric": name, "value": self.best}) + "\n")

    def on_completed(self, engine: Engine) -> None:
        if self.best is None:
            logger.warning("no validation gave a finite key metric: saving the final weights to %s", self.path)
            self(engine)


class ExportEncoder(SaveNetworkWeights):
    """On completion, write the encoder as a plain state dict and as a Hugging Face model folder (rank 0).

    Writes ``<output_dir>/model.pt`` and ``<output_dir>/encoder_hf/{config.json, model.safetensors}``.
    """

    def __init__(self, encoder: nn.Module, output_dir: str | os.PathLike):
        super().__init__(encoder, Path(output_dir) / "model.pt")
        self.output_dir = Path(output_dir)

    def targets(self) -> list[Path]:
        return [self.path, self.output_dir / "encoder_hf"]

    def save(self, encoder: nn.Module) -> None:
        from ctfm.checkpoint import save_hf_folder

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


def ddp_timeout(timeout_s: float | None = None) -> datetime.timedelta:
    """The collective timeout: ``timeout_s``, else ``$CTFM_DDP_TIMEOUT_S``, else :data:`DEFAULT_DDP_TIMEOUT_S` (seconds)."""
    raw = timeout_s if timeout_s is not None else (os.environ.get("CTFM_DDP_TIMEOUT_S") or DEFAULT_DDP_TIMEOUT_S)
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        source = "timeout_s" if timeout_s is not None else "CTFM_DDP_TIMEOUT_S"
        raise CTFMError(f"{source}={raw!r}: not a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(timeout_s: float | None = None) -> torch.device:
    """Join the ``torchrun`` process group (NCCL with CUDA, gloo on CPU) and return this rank's device.

    A collective waits at most :func:`ddp_timeout` (default 300 s, ``$CTFM_DDP_TIMEOUT_S``) for a hung or
    dead peer; then it raises in this rank (gloo; NCCL tears the process down), the exception ends the
    engine's run and the process, and ``torchrun`` stops the other ranks.
    """
    cuda = torch.cuda.is_available()
    timeout = ddp_timeout(timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
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
