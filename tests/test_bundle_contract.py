"""MONAI's bundle contract, checked in-process with MONAI's own code (as the model zoo's unit tests do).

Every config of every bundle passes ``ConfigWorkflow.check_properties()``; ``monai.bundle.load`` with its default
arguments returns the shipped weights; a bundle copied elsewhere finds its own folder; a misspelt command-line
id stops the run; importing ``ctfm`` changes nothing in the host process.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import monai.bundle
import pytest
import torch
from monai.bundle import ConfigWorkflow
from safetensors.torch import load_file

from ctfm.bundle import check_overrides, config_ids
from ctfm.checkpoint import save_hf_folder, save_state_dict
from ctfm.networks import CTFMClassifier, CTFMEmbeddingEncoder, CTFMViT, build_encoder
from ctfm.errors import CTFMError
from ctfm.weights import fetch

from conftest import tiny_vit_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
#: (bundle, config files, workflow type): every base config and every override that runs on one machine.
WORKFLOWS = [
    ("ctfm_pretrain", ["inference.json"], "infer"),
    ("ctfm_pretrain", ["inference.json", "inference_onnx.json"], "infer"),
    ("ctfm_pretrain", ["inference.json", "inference_trt.json"], "infer"),
    ("ctfm_pretrain", ["train.json"], "train"),
    ("ctfm_pretrain", ["train.json", "train_ctfm.json"], "train"),
    ("ctfm_pretrain", ["train.json", "train_dino.json"], "train"),
    ("ctfm_pretrain", ["train.json", "train_dino.json", "train_dino_vit.json"], "train"),
    ("ctfm_pretrain", ["train.json", "train_dino.json", "train_dino_vit.json", "recipe_fmct.json"], "train"),
    ("ctfm_segmentation", ["inference.json"], "infer"),
    ("ctfm_segmentation", ["inference.json", "inference_onnx.json"], "infer"),
    ("ctfm_segmentation", ["inference.json", "inference_trt.json"], "infer"),
    ("ctfm_segmentation", ["train.json"], "train"),
    ("ctfm_segmentation", ["train.json", "evaluate.json"], "infer"),
    ("ctfm_triage", ["inference.json"], "infer"),
    ("ctfm_triage", ["inference.json", "inference_onnx.json"], "infer"),
    ("ctfm_triage", ["inference.json", "inference_trt.json"], "infer"),
    ("ctfm_triage", ["train.json"], "train"),
    ("ctfm_triage", ["train.json", "recipe_fmct.json"], "train"),
    ("ctfm_triage", ["train.json", "evaluate.json"], "infer"),
    ("ctfm_triage", ["train.json", "probe.json"], "train"),
    ("ctfm_retrieval", ["extract.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "extract_onnx.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "extract_trt.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "index.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "query.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "evaluate.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "probe.json"], "infer"),
]
#: The ViT overrides (``encoder_vit.json``; no ViT weights ship, so each run names a tiny ViT's weights the test makes).
VIT_WORKFLOWS = [
    ("ctfm_triage", ["train.json", "recipe_fmct.json", "encoder_vit.json"], "train"),
    ("ctfm_triage", ["inference.json", "recipe_fmct.json", "encoder_vit.json"], "infer"),
    ("ctfm_retrieval", ["extract.json", "encoder_vit.json"], "infer"),
]
#: The ``vit_*`` ids of the tiny ViT's width and depth (its size and patch stay the overrides' FM-CT values).
TINY_VIT = {f"vit_{k}": v for k, v in tiny_vit_config().items() if k in ("hidden_size", "mlp_dim", "num_layers", "num_heads")}


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory) -> Path:
    """A weights cache holding the pre-training demo encoder, as ``python -m ctfm.weights fetch`` makes it."""
    cache = tmp_path_factory.mktemp("weights")
    fetch("ctfm_pretrain_demo", source=BUNDLES / "ctfm_pretrain", dest=cache / "ctfm_pretrain_demo")
    return cache


@pytest.fixture
def workflow(monkeypatch, weights_cache):
    """Build and initialise a ``ConfigWorkflow``; restores what a config's ``initialize`` sets process-wide."""
    monkeypatch.setenv("CTFM_WEIGHTS_DIR", str(weights_cache))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    handlers = logging.getLogger().handlers
    filters = [list(h.filters) for h in handlers]

    def make(bundle, configs, workflow_type, **override):
        files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
        if workflow_type == "train":  # as ci/verify_bundle.py: resolve the datasets without filling their caches
            override = {"cache_rate": 0.0, "num_workers": 0, **override}
        w = ConfigWorkflow(config_file=files, workflow_type=workflow_type, logging_file=False, **override)
        w.initialize()
        return w

    yield make
    for handler, kept in zip(handlers, filters):
        handler.filters[:] = kept


@pytest.mark.parametrize("bundle, configs, workflow_type", WORKFLOWS, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_check_properties_finds_nothing_missing(workflow, bundle, configs, workflow_type):
    w = workflow(bundle, configs, workflow_type)
    assert w.check_properties() == []
    assert w.bundle_root == str(BUNDLES / bundle)  # the folder the config was read from


@pytest.mark.parametrize("bundle, configs, workflow_type", VIT_WORKFLOWS, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_vit_overrides_pass_check_properties(workflow, tmp_path, bundle, configs, workflow_type):
    """FM-CT's ViT in place of CT-FM's encoder by one override file, its weights given as a user does."""
    vit = tiny_vit_config(img_size=[96, 96, 96])
    encoder = save_hf_folder(build_encoder({**vit, "in_channels": 1}), tmp_path / "vit_hf")  # a DINO export's layout
    if workflow_type == "train":  # fine-tuning from a one-channel ViT: the stem adapts to the three windows
        overrides = {"load_pretrain": True, "encoder_weights": str(encoder)}
    elif bundle == "ctfm_triage":  # a ViT classifier trained by the user
        overrides = {"ckpt_path": str(save_state_dict(CTFMClassifier(4, {**vit, "in_channels": 3}), tmp_path / "model.pt"))}
    else:  # a frozen ViT encoder
        overrides = {"ckpt_path": str(encoder)}
    w = workflow(bundle, configs, workflow_type, **TINY_VIT, **overrides)
    assert w.check_properties() == []
    network = w.parser.get_parsed_content("network_def" if workflow_type == "train" else "network")
    backbone = network.encoder if bundle == "ctfm_triage" else network
    assert isinstance(backbone, CTFMViT) and backbone.in_channels == (3 if bundle == "ctfm_triage" else 1)


def test_every_config_file_is_covered():
    covered = {(b, c) for b, configs, _ in WORKFLOWS + VIT_WORKFLOWS for c in configs}
    needs_more = {"multi_gpu_train.json", "inference_ctfm_whole_body.json"}  # torchrun / CT-FM's published weights
    for config in BUNDLES.glob("*/configs/*.json"):
        if config.name != "metadata.json" and config.name not in needs_more:
            assert (config.parents[1].name, config.name) in covered, config


def test_monai_bundle_load_with_defaults_returns_the_shipped_weights(tmp_path):
    for name, shipped, config in [
        ("ctfm_pretrain", "models/encoder_hf/model.safetensors", {}),
        ("ctfm_segmentation", "models/model.pt", {}),
        ("ctfm_triage", "models/model.pt", {}),
        # no train.json to read network_def from (a frozen encoder): MONAI returns the state dict, or fills a model
        ("ctfm_retrieval", "models/model.pt", {"model": CTFMEmbeddingEncoder(init_filters=8)}),
    ]:
        shutil.copytree(BUNDLES / name, tmp_path / name, ignore=shutil.ignore_patterns("eval", "runs"))
        network = monai.bundle.load(name, bundle_dir=str(tmp_path), **config)
        path = tmp_path / name / shipped
        expected = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        if config:
            weights_only = monai.bundle.load(name, bundle_dir=str(tmp_path))
            assert all(torch.equal(weights_only[k], expected[k]) for k in expected) and sorted(weights_only) == sorted(expected)
        state = network.state_dict()
        assert sorted(state) == sorted(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected), name


@pytest.mark.parametrize("bundle", ["ctfm_segmentation", "ctfm_triage"])
def test_training_into_a_run_folder_reads_the_encoder_the_bundle_ships(monkeypatch, tmp_path, bundle):
    """The documented training command (``--bundle_root RUN_DIR``) on a fresh machine (an empty weights cache): the
    pre-trained encoder comes from the bundle folder the config was read from, not from the run folder."""
    monkeypatch.setenv("CTFM_WEIGHTS_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    w = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / "train.json"), workflow_type="train", logging_file=False,
                       bundle_root=str(tmp_path / "run"), cache_rate=0.0, num_workers=0)
    w.initialize()
    assert w.check_properties() == []
    shipped = load_file(str(BUNDLES / bundle / "models" / "ctfm_pretrain_demo" / "model.safetensors"))
    encoder = w.parser.get_parsed_content("network_def").encoder.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in shipped.items() if k in encoder) and "conv_init.weight" in encoder


def test_a_copied_bundle_uses_its_own_folder(tmp_path, workflow):
    shutil.copytree(BUNDLES / "ctfm_segmentation", tmp_path / "copy", ignore=shutil.ignore_patterns("eval"))
    files = [str(tmp_path / "copy" / "configs" / "inference.json")]
    w = ConfigWorkflow(config_file=files, workflow_type="infer", logging_file=False)
    w.initialize()
    assert w.bundle_root == str(tmp_path / "copy")
    assert w.parser.get_parsed_content("ckpt_path") == str(tmp_path / "copy" / "models" / "model.pt")
    assert w.parser.get_parsed_content("output_dir") == str(tmp_path / "copy" / "eval")


def test_unknown_override_ids_are_refused_and_known_ones_pass(tmp_path):
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"dataset_dir": ".", "network_def": {"_target_": "Net", "width": 4}, "train": {"lr": 1}}))
    check_overrides({"dataset_dir": "x", "network_def#width": 8, "train::lr": 2, "config_file": "y"}, config)
    check_overrides({"network_def#depth": 3}, config)  # a new argument of a component: the component judges it
    with pytest.raises(CTFMError, match=r"inference.json: no config of this run defines --dataset_dirr, --train#lrr"):
        check_overrides({"dataset_dirr": "x", "train#lrr": 1}, str(config))
    assert {"network_def", "network_def#width", "train#lr"} <= config_ids(json.loads(config.read_text()))


def test_check_overrides_reads_every_config_file_of_the_run(tmp_path):
    base, override = tmp_path / "a.json", tmp_path / "b.json"
    base.write_text(json.dumps({"x": 1}))
    override.write_text(json.dumps({"onnx_path": "m.onnx"}))
    check_overrides({"onnx_path": "n.onnx", "x": 2}, f"['{base}', '{override}']")
    with pytest.raises(CTFMError, match="onnx_path"):
        check_overrides({"onnx_path": "n.onnx"}, str(base))


def test_importing_ctfm_changes_nothing_in_the_host_process():
    code = (
        "import logging, sys\n"
        "import ctfm, ctfm.networks, ctfm.weights, ctfm.engine, ctfm.ct_io, ctfm.embedding, ctfm.bundle\n"
        "import ctfm.segmentation.outputs, ctfm.segmentation.evaluation, ctfm.pretrain.simclr\n"
        "import ctfm.retrieval.extract, ctfm.retrieval.index, ctfm.retrieval.query, ctfm.retrieval.probe, ctfm.retrieval.evaluation\n"
        "assert sys.excepthook is sys.__excepthook__\n"
        "assert not any(h.filters for h in logging.getLogger().handlers)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_module_declares_its_public_names():
    for path in (ROOT / "shared" / "ctfm").rglob("*.py"):
        assert "__all__" in path.read_text(), path
