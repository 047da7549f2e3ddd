"""Every published CT-FM weight layout loads and gives embeddings identical to MONAI's reference module."""

import json
import pickle

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from monai.networks.nets import SegResNetDS
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import save_file

from conftest import randomise
from ctfm.checkpoint import CheckpointError, load_encoder, load_weights, save_hf_folder, save_state_dict
from ctfm.networks import CTFMEncoder, ProjectionHead
from ctfm.files import sha256sum

ARGS = {"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": (1, 2, 2, 4, 4)}


class HubSegResEncoder(SegResEncoder, PyTorchModelHubMixin):
    """How CT-FM's feature extractor is published: MONAI's encoder with huggingface_hub's mixin, whose
    ``config.json`` holds the four constructor arguments."""

    def __init__(self, spatial_dims: int, in_channels: int, init_filters: int, blocks_down: tuple):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, init_filters=init_filters, blocks_down=blocks_down)


class FullArgsHubSegResEncoder(SegResEncoder, PyTorchModelHubMixin):
    """The mixin on MONAI's class as is: ``config.json`` also lists the defaults (act, norm, ...)."""


@pytest.fixture
def reference() -> SegResEncoder:
    """MONAI's own module holding the weights every layout below is written from."""
    return randomise(SegResEncoder(**ARGS), seed=3)


def embed(module, x):
    with torch.no_grad():
        return module.eval()(x)[-1].mean(dim=(2, 3, 4))


def assert_loads_identically(path, reference, ct_batch):
    encoder = CTFMEncoder(init_filters=4)
    report = load_weights(encoder, path)
    assert len(report.matched) == len(encoder.state_dict()) and not report.missing
    assert torch.equal(encoder.eval().embed(ct_batch), embed(reference, ct_batch))
    return report


def test_huggingface_folder_written_by_the_mixin(tmp_path, reference, ct_batch):
    hub = HubSegResEncoder(**ARGS)
    hub.load_state_dict(reference.state_dict())
    hub.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == {
        "blocks_down": [1, 2, 2, 4, 4],
        "in_channels": 1,
        "init_filters": 4,
        "spatial_dims": 3,
    }
    report = assert_loads_identically(tmp_path / "hf", reference, ct_batch)
    assert report.layout == "huggingface folder" and report.prefix == "" and not report.unexpected
    encoder, _ = load_encoder(tmp_path / "hf")
    assert encoder.init_filters == 4
    assert torch.equal(encoder.eval().embed(ct_batch), embed(reference, ct_batch))


def test_huggingface_folder_listing_default_settings(tmp_path, reference, ct_batch):
    hub = FullArgsHubSegResEncoder(**ARGS, act="relu", norm="batch")
    hub.load_state_dict(reference.state_dict())
    hub.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["act"] == "relu"
    assert_loads_identically(tmp_path / "hf", reference, ct_batch)
    encoder, _ = load_encoder(tmp_path / "hf")
    assert encoder.init_filters == 4


def test_segresnetds_state_dict(tmp_path, reference, ct_batch):
    net = SegResNetDS(**ARGS, out_channels=118, dsdepth=4)
    net.encoder.load_state_dict(reference.state_dict())
    torch.save(net.state_dict(), tmp_path / "segresnet.pt")
    report = assert_loads_identically(tmp_path / "segresnet.pt", reference, ct_batch)
    assert report.prefix == "encoder."
    assert report.unexpected and all(k.startswith("up_layers.") for k in report.unexpected)
    # the whole segmentation network loads too, decoder included
    net2 = SegResNetDS(**ARGS, out_channels=118, dsdepth=4)
    assert not load_weights(net2, tmp_path / "segresnet.pt").unexpected
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))


@pytest.mark.parametrize("backbone_prefix", ["model.backbone.", "model._orig_mod.backbone.", "model.backbone._orig_mod."])
def test_lightning_checkpoint(tmp_path, reference, ct_batch, backbone_prefix):
    head = ProjectionHead(64)
    state = {backbone_prefix + k: v for k, v in reference.state_dict().items()}
    state |= {"model.projection_head." + k: v for k, v in head.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 449, "global_step": 224500, "pytorch-lightning_version": "2.2.0"}, tmp_path / "last.ckpt")
    report = assert_loads_identically(tmp_path / "last.ckpt", reference, ct_batch)
    assert report.layout == "lightning checkpoint" and report.prefix == "model.backbone."
    assert sorted(report.unexpected) == sorted("model.projection_head." + k for k in head.state_dict())
    assert "_orig_mod" not in report.summary()


@pytest.mark.parametrize("name", ["plain.pt", "plain.safetensors", "ddp.pth"])
def test_plain_state_dicts(tmp_path, reference, ct_batch, name):
    state = reference.state_dict()
    if name.startswith("ddp"):
        state = {"module." + k: v for k, v in state.items()}
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    else:
        torch.save(state, tmp_path / name)
    assert_loads_identically(tmp_path / name, reference, ct_batch)


def test_load_encoder_infers_width_from_a_state_dict(tmp_path, reference, ct_batch):
    torch.save({"state_dict": {"model.backbone." + k: v for k, v in reference.state_dict().items()}}, tmp_path / "x.ckpt")
    encoder, report = load_encoder(tmp_path / "x.ckpt")
    assert encoder.config["init_filters"] == 4 and encoder.config["blocks_down"] == [1, 2, 2, 4, 4]
    assert torch.equal(encoder.eval().embed(ct_batch), embed(reference, ct_batch))


def test_our_exports_round_trip(tmp_path, small_encoder, ct_batch):
    save_hf_folder(small_encoder, tmp_path / "hf")
    save_state_dict(small_encoder, tmp_path / "model.pt")
    hub = HubSegResEncoder.from_pretrained(str(tmp_path / "hf"))  # huggingface_hub reads our folder as its own
    assert torch.equal(embed(hub, ct_batch), small_encoder.embed(ct_batch))
    for path in (tmp_path / "hf", tmp_path / "model.pt"):
        encoder, _ = load_encoder(path)
        assert torch.equal(encoder.eval().embed(ct_batch), small_encoder.embed(ct_batch))


def test_shape_mismatch_is_a_clear_error(tmp_path):
    save_state_dict(CTFMEncoder(init_filters=8), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"wide\.pt: .* differ in shape .*conv_init\.weight"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "wide.pt")


def test_other_architecture_is_a_clear_error(tmp_path):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(CheckpointError, match=r"linear\.pt: no key fits CTFMEncoder"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "linear.pt")
    save_state_dict(CTFMEncoder(init_filters=4, blocks_down=(1, 2, 2, 4)), tmp_path / "four_levels.pt")
    with pytest.raises(CheckpointError, match=r"keys of CTFMEncoder missing"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "four_levels.pt")


def test_hf_config_of_another_architecture(tmp_path, small_encoder):
    save_hf_folder(small_encoder, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**small_encoder.config, "in_channels": 4}))
    with pytest.raises(CheckpointError, match=r"config\.json: architecture differs.*in_channels=4"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**small_encoder.config, "norm": "instance"}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a CT-FM encoder, ViT, SegResNetDS or classifier config .*norm"):
        load_encoder(tmp_path / "hf")


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_never_unpickles_arbitrary_objects(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"conv_init.weight": torch.zeros(1)}, "hook": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not loadable as a tensors-only checkpoint"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "evil.pt")
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_sha256_is_checked(tmp_path, small_encoder):
    path = save_state_dict(small_encoder, tmp_path / "model.pt")
    load_weights(CTFMEncoder(init_filters=4), path, sha256=sha256sum(path))
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(CTFMEncoder(init_filters=4), path, sha256="0" * 64)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "nope.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "broken.safetensors")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_weights(CTFMEncoder(init_filters=4), tmp_path / "empty_folder")
