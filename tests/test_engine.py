"""Crash-safe training: atomic checkpoints flushed to disk, stale temporaries removed, fallback past an unreadable
checkpoint, and a resumed run that ends with bit-identical weights (CPU) to an uninterrupted one."""

import datetime
import logging
import os
import random
import subprocess
import sys
import time

import ctfm.engine as engine_module
import ctfm.files as files_module
import numpy as np
import pytest
import torch
from ctfm.engine import (
    AtomicCheckpointSaver,
    ResumeFromLatest,
    checkpoint_path,
    checkpoints,
    ddp_timeout,
    init_distributed,
    latest_checkpoint,
    random_states_of,
    rng_state,
    set_rng_state,
)
from ctfm.errors import CTFMError
from ctfm.files import atomic_path, remove_stale_temporaries
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import (
    Compose,
    MapTransform,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
)
from monai.utils import set_determinism
from torch import nn

EPOCHS = 2
BATCH = 2


class GlobalNoised(MapTransform):
    """Draws from the global torch, numpy and Python generators (not from an ``R`` of its own)."""

    def __call__(self, data):
        d = dict(data)
        d["image"] = d["image"] + 0.01 * torch.rand(d["image"].shape) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return d


class SharedViews(Randomizable, MapTransform):
    """Holds sub-transforms that share its ``R`` (as ``ctfm``'s ``IntraSampleViewsd`` does)."""

    def __init__(self):
        MapTransform.__init__(self, "image")
        self.view = Compose([RandGaussianNoised("image", prob=1.0, std=0.05), RandScaleIntensityd("image", factors=0.3, prob=1.0)])

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.view.set_random_state(state=self.R)
        return self

    def randomize(self, data=None):
        pass

    def __call__(self, data):
        return self.view(dict(data))


def build(root, n_items=8, generator=False, num_workers=0, handlers=(), restore_rng=True, interval=2):
    """Fresh objects, built alike from seed 0: a tiny net with dropout, random transforms, a shuffled loader."""
    set_determinism(seed=0)
    items = [{"image": torch.linspace(-1, 1, 4) * (i + 1) / n_items, "label": torch.tensor([float(i % 3)])} for i in range(n_items)]
    transform = Compose([RandGaussianNoised("image", prob=0.7, std=0.1), SharedViews(), GlobalNoised("image")])
    g = torch.Generator().manual_seed(1234) if generator else None
    loader = DataLoader(Dataset(items, transform), batch_size=BATCH, shuffle=True, generator=g, num_workers=num_workers)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    ckpt = root / "checkpoints"
    objects = {"network": net, "optimizer": opt}
    train_handlers = []
    if "resume" in handlers:
        train_handlers.append(ResumeFromLatest(ckpt, objects, restore_rng=restore_rng))
    if "save" in handlers:
        train_handlers.append(AtomicCheckpointSaver(ckpt, objects, interval=interval, n_saved=2))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=EPOCHS, epoch_length=4, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=nn.MSELoss(), train_handlers=train_handlers, amp=False,
    )
    return trainer, net


class Killed(Exception):
    pass


def run(root, stop=None, **kwargs):
    """Train; with ``stop``, die (an exception, no COMPLETED) right after that iteration's handlers."""
    trainer, net = build(root, handlers=("resume", "save"), **kwargs)
    if stop is not None:

        @trainer.on(engine_module.Events.ITERATION_COMPLETED(once=stop))
        def die(_):
            raise Killed(stop)

    try:
        trainer.run()
    except Killed:
        pass
    return trainer, {k: v.clone() for k, v in net.state_dict().items()}


def uninterrupted(root, **kwargs):
    trainer, net = build(root, **kwargs)  # no ctfm handlers at all: the tracked loader must change nothing
    trainer.run()
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |dW| = {(a[k] - b[k]).abs().max().item():.3g}"


# n_items 8: 4 batches an epoch (one iterator per epoch); 4: 2 batches, so ignite makes iterators mid-epoch.
# stop 3 -> resume at 2 (mid-iterator), 5 -> 4 (epoch end, iterator used up), 7 -> 6 (mid epoch 2).
@pytest.mark.parametrize("n_items", [8, 4])
@pytest.mark.parametrize("generator", [False, True])
@pytest.mark.parametrize("stop", [3, 5, 7])
def test_resumed_run_ends_with_bit_identical_weights(tmp_path, n_items, generator, stop):
    straight = uninterrupted(tmp_path / "straight", n_items=n_items, generator=generator)
    trainer, _ = run(tmp_path / "killed", stop=stop, n_items=n_items, generator=generator)
    assert trainer.state.iteration == stop
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == f"checkpoint_iteration={stop - 1}.pt"
    trainer, resumed = run(tmp_path / "killed", n_items=n_items, generator=generator)
    assert trainer.state.iteration == EPOCHS * 4
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "checkpoint_iteration=8.pt"
    assert_same(resumed, straight)


def test_resume_with_dataloader_workers_is_bit_identical(tmp_path):
    # without persistent workers, each iterator's workers are seeded from torch's state when it is made
    straight = uninterrupted(tmp_path / "straight", num_workers=2)
    run(tmp_path / "killed", stop=3, num_workers=2)
    _, resumed = run(tmp_path / "killed", num_workers=2)
    assert_same(resumed, straight)


def test_resume_without_random_states_differs(tmp_path):
    """The check above is not vacuous: weights and optimizer alone do not reproduce the run."""
    straight = uninterrupted(tmp_path / "straight")
    run(tmp_path / "killed", stop=3)
    _, resumed = run(tmp_path / "killed", restore_rng=False)
    assert any(not torch.equal(resumed[k], straight[k]) for k in straight)


def test_checkpoint_holds_weights_only_random_states(tmp_path):
    run(tmp_path, stop=3)
    ckpt = torch.load(checkpoint_path(tmp_path / "checkpoints", 2), weights_only=True)
    rng = ckpt["rng"]
    assert rng["batches_drawn"] == 2 and ckpt["trainer"]["iteration"] == 2
    # Compose.R, RandGaussianNoised.R, SharedViews.R (shared by its views) and the views' Compose ... each once
    now = rng["now"]
    assert len(now["randomizables"]) == len(rng["iterator"]["randomizables"]) >= 3
    assert now["torch"].dtype == torch.uint8 and now["numpy"]["keys"].shape == (624,)
    assert len(now["python"][1]) == 625


def test_random_states_of_lists_a_shared_state_once():
    views = SharedViews().set_random_state(seed=3)
    states = random_states_of(Compose([views, RandGaussianNoised("image", prob=1.0)]).set_random_state(seed=1))
    # the outer Compose, SharedViews (its views' Compose shares it), the two views and the noise, and the array
    # transforms these three dictionary transforms draw from (each has an R of its own): 8, each once
    assert len(states) == len({id(s) for s in states}) == 8
    noise = views.view.transforms[0]
    assert any(s is noise.R for s in states) and any(s is noise.rand_gaussian_noise.R for s in states)
    assert views.view.R is views.R and any(s is views.R for s in states)


def test_rng_state_round_trip(tmp_path):
    r = np.random.RandomState(5)
    g = torch.Generator().manual_seed(9)
    r.rand(3), np.random.rand(2), random.random(), torch.rand(2)
    torch.save(rng_state([r], [g]), tmp_path / "s.pt")
    first = (torch.rand(3), np.random.rand(3), random.random(), r.rand(3), torch.rand(3, generator=g))
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True), [r], [g])
    again = (torch.rand(3), np.random.rand(3), random.random(), r.rand(3), torch.rand(3, generator=g))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert np.array_equal(first[3], again[3]) and torch.equal(first[4], again[4])


def test_unreadable_newest_checkpoint_falls_back_in_one_warning(tmp_path, caplog):
    straight = uninterrupted(tmp_path / "straight")
    run(tmp_path / "killed", stop=5)  # checkpoints 2 and 4
    ckpts = tmp_path / "killed" / "checkpoints"
    newest = checkpoint_path(ckpts, 4)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="ctfm.engine"):
        _, resumed = run(tmp_path / "killed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "ctfm.engine"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"{newest}: unreadable checkpoint (")
    assert f"falling back to {checkpoint_path(ckpts, 2)}" in warnings[0]
    assert (ckpts / "checkpoint_iteration=4.pt.unreadable").is_file()
    assert_same(resumed, straight)  # resumed from 2, rewrote 4, ended equal


def test_no_readable_checkpoint_raises_one_line(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for i in (2, 4):
        checkpoint_path(ckpts, i).write_bytes(b"not a checkpoint")
    with pytest.raises(CTFMError) as err:
        ResumeFromLatest(ckpts, {}).load_newest()
    assert "\n" not in str(err.value) and str(ckpts) in str(err.value) and "checkpoint_iteration=4.pt" in str(err.value)
    assert [p.name for p in checkpoints(ckpts)] == ["checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt"]  # left as found
    assert ResumeFromLatest(tmp_path / "empty", {}).load_newest() is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_remove_stale_temporaries(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        names = {
            "dead": f".checkpoint_iteration=4.pt.{dead}.ab12cd_9.tmp",
            "mine": f".checkpoint_iteration=6.pt.{os.getpid()}.zz12cd_9.tmp",  # same PID, not being written: a reused PID
            "live": f".checkpoint_iteration=8.pt.{live.pid}.qq12cd_9.tmp",
            "live_old": f".checkpoint_iteration=10.pt.{live.pid}.ww12cd_9.tmp",
            "legacy_old": ".checkpoint_iteration=2.pt.k3j4h5g6.tmp",
            "legacy_new": ".checkpoint_iteration=3.pt.k3j4h5g7.tmp",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "x").write_bytes(b"half")
        for key in ("live_old", "legacy_old"):
            past = time.time() - 2 * files_module.STALE_AFTER_S
            os.utime(tmp_path / names[key] / "x", (past, past))
            os.utime(tmp_path / names[key], (past, past))
        others = [".hidden", "checkpoint_iteration=2.pt", ".checkpoint_iteration=2.pt.tmp", ".notes.123.txt"]
        for name in others:
            (tmp_path / name).write_bytes(b"keep")
        swapped_target = tmp_path / "encoder_hf"  # killed between a folder swap's two renames
        (tmp_path / f".encoder_hf.{dead}.old").mkdir()
        removed = remove_stale_temporaries(tmp_path)
        assert {p.name for p in removed} == {names[k] for k in ("dead", "mine", "live_old", "legacy_old")} | {f".encoder_hf.{dead}.old"}
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names["live"], names["legacy_new"], *others, "encoder_hf"} and swapped_target.is_dir()
    finally:
        live.kill()
        live.wait()


def test_atomic_path_names_its_temporary_by_pid_and_keeps_it_from_cleanup(tmp_path):
    with atomic_path(tmp_path / "a.pt") as tmp:
        assert tmp.parent.name.startswith(f".a.pt.{os.getpid()}.") and tmp.parent.name.endswith(".tmp")
        tmp.write_bytes(b"data")
        assert remove_stale_temporaries(tmp_path) == []
    assert (tmp_path / "a.pt").read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_atomic_path_fsyncs_file_folder_contents_and_parent(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files_module.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with atomic_path(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"x")
    assert [os.path.basename(p) for p in synced] == ["f.bin", tmp_path.name]
    synced.clear()
    with atomic_path(tmp_path / "d", is_dir=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a").write_bytes(b"a")
        (tmp / "b").write_bytes(b"b")
    names = [os.path.basename(p) for p in synced]
    assert sorted(names[:-2]) == ["a", "b", "sub"] and names[-1] == tmp_path.name  # contents, the folder, the parent
    assert (tmp_path / "d" / "sub" / "a").read_bytes() == b"a"


def test_saver_removes_stale_temporaries_at_start(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = ckpts / f".checkpoint_iteration=2.pt.{_dead_pid()}.abcdefgh.tmp"
    stale.mkdir()
    trainer, _ = build(tmp_path, handlers=("save",))
    trainer.run()
    assert not stale.exists() and [p.name for p in checkpoints(ckpts)] == ["checkpoint_iteration=6.pt", "checkpoint_iteration=8.pt"]


def test_init_distributed_passes_the_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine_module.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(engine_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CTFM_DDP_TIMEOUT_S", raising=False)
    assert init_distributed() == torch.device("cpu")
    monkeypatch.setenv("CTFM_DDP_TIMEOUT_S", "12.5")
    init_distributed()
    init_distributed(timeout_s=7)
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=s)} for s in (300, 12.5, 7)]
    monkeypatch.setenv("CTFM_DDP_TIMEOUT_S", "soon")
    with pytest.raises(CTFMError, match="CTFM_DDP_TIMEOUT_S='soon'"):
        ddp_timeout()
    with pytest.raises(CTFMError, match="timeout_s=0"):
        ddp_timeout(0)


def test_best_weights_are_saved_on_improvement_only_and_survive_a_resume(tmp_path):
    from types import SimpleNamespace

    from ctfm.engine import SaveBestNetworkWeights

    net = nn.Linear(2, 1)
    path = tmp_path / "model.pt"
    validator = SimpleNamespace(state=SimpleNamespace(key_metric_name="val_auroc", metrics={}), add_event_handler=lambda *a: None)
    saver = SaveBestNetworkWeights(net, path, validator)
    saver.on_started(SimpleNamespace(state=SimpleNamespace(iteration=0)))
    saved = []
    for value in (0.6, 0.55, 0.7, float("nan"), 0.7):
        with torch.no_grad():
            net.bias.fill_(value)
        validator.state.metrics["val_auroc"] = value
        saver.on_validation(validator)
        saved.append(round(float(torch.load(path, weights_only=True)["bias"]), 4))
    assert saved == [0.6, 0.6, 0.7, 0.7, 0.7]
    resumed = SaveBestNetworkWeights(net, path, validator)
    resumed.on_started(SimpleNamespace(state=SimpleNamespace(iteration=96)))  # resumed from a checkpoint
    validator.state.metrics["val_auroc"] = 0.65  # below the best saved before the kill: kept out
    resumed.on_validation(validator)
    assert resumed.best == 0.7 and round(float(torch.load(path, weights_only=True)["bias"]), 4) == 0.7
    fresh = SaveBestNetworkWeights(net, path, validator)
    fresh.on_started(SimpleNamespace(state=SimpleNamespace(iteration=0)))  # a new run: its own first best
    assert fresh.best is None
