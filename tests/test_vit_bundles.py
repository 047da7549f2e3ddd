"""FM-CT's ViT through every bundle that takes a backbone, each by its one override file, as a user runs them:

1. ``ctfm_pretrain``: DINO + MIM on FM-CT's ViT (``train_dino_vit.json``) with FM-CT's head-CT preprocessing
   (``recipe_fmct.json``: RAS, three HU windows as channels) on head phantoms; the export loads back;
2. ``ctfm_triage``: FM-CT's triage recipe on the ViT (``recipe_fmct.json`` + ``encoder_vit.json``) fine-tuned from
   that export, then inference with Grad-CAM saliency on the ViT's token map, then the probe (few-shot);
3. ``ctfm_retrieval``: ``extract.json`` + ``encoder_vit.json`` with a ViT of patch 12 (not a multiple of the CNN's
   16): patches and crops are rounded to the ViT's patch size; then the probe.

Tiny sizes throughout (ViT width 48, grids of 4-6 mm).
"""

import json
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors import safe_open

from ctfm.checkpoint import load_encoder, save_hf_folder
from ctfm.networks import CTFMViT, build_encoder
from ctfm.triage.demo import FINDINGS, write_phantom_set

from bundle_runs import bundle_runner  # noqa: E402
from conftest import body_phantoms, tiny_vit_config  # noqa: E402

pytestmark = pytest.mark.slow

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CPU = {"device": "$torch.device('cpu')", "num_workers": 0}
#: A ViT of width 48 on 16 x 32 x 32 inputs, patch 8 (the pre-training bundle's and the triage bundle's ids).
VIT = {"vit_patch_size": "[8,8,8]", "vit_hidden_size": 48, "vit_mlp_dim": 64, "vit_num_layers": 2, "vit_num_heads": 2}


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """12 training and 6 test head phantoms in the triage demo's layout (its dataset.json lists the training CTs)."""
    return write_phantom_set(tmp_path_factory.mktemp("heads"), n_train=12, n_test=6)


@pytest.fixture(scope="module")
def dino_vit(tmp_path_factory, heads) -> Path:
    """The pre-training bundle's DINO + MIM run on the ViT with FM-CT's head-CT preprocessing; its run folder."""
    run = tmp_path_factory.mktemp("pretrain")
    bundle_runner(BUNDLES / "ctfm_pretrain" / "configs")(
        ["train.json", "train_dino.json", "train_dino_vit.json", "recipe_fmct.json"], bundle_root=run, dataset_dir=heads,
        spacing="[4,4,4]", crop_size="[20,40,40]", global_size="[16,32,32]", local_crop_size="[16,16,16]", local_size="[8,16,16]",
        num_local_crops=2, num_prototypes=64, head_hidden_features=32, mask_probability=1.0, warmup_iterations=0,
        epoch_length=3, max_epochs=1, checkpoint_interval=3, **VIT, **CPU)
    return run


def test_pretraining_on_head_ct_exports_a_three_window_vit(dino_vit):
    vit, report = load_encoder(dino_vit / "models" / "encoder_hf")
    assert isinstance(vit, CTFMViT) and vit.in_channels == 3 and vit.hidden_size == 48 and not report.missing
    assert vit.img_size == (16, 32, 32) and vit.embed(torch.rand(1, 3, 16, 32, 32)).shape == (1, 48)


def test_triage_fine_tunes_infers_and_probes_on_the_vit(tmp_path, heads, dino_vit):
    run = bundle_runner(BUNDLES / "ctfm_triage" / "configs")
    recipe = {"spacing": "[4,4,4]", "input_size": "[16,32,32]", "vit_img_size": "[16,32,32]", "device": CPU["device"], **VIT}
    fmct_vit = ["recipe_fmct.json", "encoder_vit.json"]
    export = dino_vit / "models" / "encoder_hf"
    proc = run(["train.json", *fmct_vit], bundle_root=tmp_path, dataset_dir=heads, load_pretrain=True, num_workers=0,
               encoder_weights=export, max_epochs=1, **recipe)
    log = proc.stdout + proc.stderr
    assert re.search(rf"encoder initialised from {re.escape(str(export))} \(huggingface folder\): \d+ matched, 0 missing, 0 unexpected", log)
    assert "adapted" not in log  # the export already reads three windows
    state = torch.load(tmp_path / "models" / "model_fmct.pt", weights_only=True)
    pretrained, _ = load_encoder(export)
    fresh = build_encoder(pretrained.config)
    stem = "patch_embedding.patch_embeddings.weight"
    assert state[f"encoder.{stem}"].shape == (48, 3, 8, 8, 8)
    # one epoch at lr 1e-4 moves the weights a little away from the export, far less than a fresh init lies from it
    moved = float((state[f"encoder.{stem}"] - pretrained.state_dict()[stem]).norm())
    assert 0 < moved < 0.1 * float((fresh.state_dict()[stem] - pretrained.state_dict()[stem]).norm())

    out = tmp_path / "inference"
    run(["inference.json", *fmct_vit], bundle_root=tmp_path, dataset_dir=heads, datalist="imagesTs/head_test_00[0-1].nii.gz",
        output_dir=out, **recipe)
    record = json.loads((out / "imagesTs" / "head_test_000_triage.json").read_text())
    assert list(record["findings"]) == list(FINDINGS) and all(0.0 <= p <= 1.0 for p in record["findings"].values())
    assert record["saliency_finding"] in FINDINGS  # Grad-CAM on the ViT's token map
    picture = plt.imread(out / "imagesTs" / "head_test_001_saliency.png")
    assert picture.ndim == 3 and float(picture[..., :3].std()) > 0.05

    run(["train.json", *fmct_vit, "probe.json"], bundle_root=tmp_path, dataset_dir=heads, load_pretrain=True, num_workers=0,
        encoder_weights=dino_vit / "models" / "encoder_hf", shots="[1,2]", few_shot_seeds=2, label_fractions="[1.0]",
        n_bootstrap=20, output_dir=tmp_path / "probe_out", **recipe)
    metrics = json.loads((tmp_path / "probe_out" / "probe" / "metrics.json").read_text())
    assert set(metrics["encoders"]) == {"pretrained", "random"}
    assert all(json.loads((Path(e["embedding_store"]) / "store.json").read_text())["encoder"]["model_type"] == "ctfm_vit"
               for e in metrics["encoders"].values())


def test_retrieval_extracts_and_probes_with_a_patch_12_vit(tmp_path):
    bundle = tmp_path / "ctfm_retrieval"
    shutil.copytree(BUNDLES / "ctfm_retrieval", bundle, ignore=shutil.ignore_patterns("eval", "store", "index", "*.onnx*"))
    config = tiny_vit_config()  # patch 12
    vit = {f"vit_{k}": json.dumps(config[k]) for k in ("img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers", "num_heads")}
    torch.manual_seed(0)
    weights = save_hf_folder(build_encoder(config), tmp_path / "vit_hf")
    items = body_phantoms(tmp_path)
    run = bundle_runner(bundle / "configs")
    common = {"ckpt_path": weights, "dataset_dir": tmp_path, "spacing": "[6,4,4]", "roi_size": "[24,64,64]", "overlap": 0.0, **vit,
              "device": "$torch.device('cpu')"}
    run(["extract.json", "encoder_vit.json"], cwd="/", datalist="body_*[0-9].nii.gz", **common)
    (store,) = [p for p in (bundle / "store").iterdir() if p.is_dir()]
    assert json.loads((store / "store.json").read_text())["encoder"]["patch_size"] == [12, 12, 12]
    rows = sorted(p for p in store.glob("*.safetensors") if p.name != "embeddings.safetensors")
    assert len(rows) == 2
    with safe_open(str(rows[0]), framework="pt") as f:
        assert f.get_tensor("embedding").shape == (24,) and f.get_tensor("patch_embeddings").shape[1] == 24

    run(["extract.json", "encoder_vit.json", "probe.json"], cwd="/", probe_data=json.dumps(items), crops_per_organ=2,
        organs="['liver','spleen','aorta']", search_structures="['liver','spleen']", crop_size="[16,32,32]",
        min_organ_voxels=20, occlusion_mask="[12,18,18]", **common)
    metrics = json.loads((bundle / "eval" / "probe" / "metrics.json").read_text())
    for e in metrics["encoders"].values():  # crops of 16 x 32 x 32 run as 24 x 36 x 36 on the ViT
        assert e["clustering"]["crops"] == 12 and e["semantic_search"]["pairs"] == 4
