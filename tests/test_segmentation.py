"""The segmentation network on the shared encoder, weight loading, evaluation metrics and the output writer."""

import csv
import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric, SurfaceDistanceMetric
from monai.networks.nets import SegResNetDS
from monai.networks.utils import one_hot
from monai.transforms import Compose, LoadImaged

from conftest import randomise
from ctfm.checkpoint import CheckpointError, save_hf_folder, save_state_dict
from ctfm.errors import CTFMError
from ctfm.networks import CTFMEncoder, ContrastiveModel, CTFMSegResNetDS
from ctfm.networks.encoder import CTFM_BLOCKS_DOWN
from ctfm.sample_data import sample_path, totalseg_classes
from ctfm.segmentation.evaluation import SegmentationReport, class_metrics, labels_and_reference, record_eval_metrics
from ctfm.segmentation.outputs import WriteSegmentationd
from ctfm.transforms import CTFMPreprocessd, HideStringSiblingsd, inline_composes
from ctfm.weights import init_encoder
from ctfm.weights import load as load_network


def tiny(**kwargs) -> CTFMSegResNetDS:
    return CTFMSegResNetDS(init_filters=4, out_channels=kwargs.pop("out_channels", 7), **kwargs)


def test_keys_are_monai_segresnetds_keys_and_encoder_is_the_shared_one():
    network = tiny()
    reference = SegResNetDS(init_filters=4, out_channels=7, blocks_down=CTFM_BLOCKS_DOWN, dsdepth=4)
    assert isinstance(network.encoder, CTFMEncoder)
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(randomise(network).state_dict())  # a published SegResNetDS file loads as is


def test_deep_supervision_in_training_one_output_in_eval():
    network = tiny().train()
    outputs = network(torch.rand(1, 1, 16, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(1, 7, 16, 32, 32), (1, 7, 8, 16, 16), (1, 7, 4, 8, 8), (1, 7, 2, 4, 4)]
    assert network.eval()(torch.rand(1, 1, 16, 32, 32)).shape == (1, 7, 16, 32, 32)


def test_encoder_initialised_from_pretraining_exports_decoder_left_alone(tmp_path):
    encoder = randomise(CTFMEncoder(init_filters=4))
    save_hf_folder(encoder, tmp_path / "encoder_hf")
    lightning = {"state_dict": {f"model.backbone.{k}": v for k, v in encoder.state_dict().items()}}
    lightning["state_dict"]["model.projection_head.0.weight"] = torch.zeros(8, 64)
    torch.save(lightning, tmp_path / "pretrain.ckpt")
    for source in (tmp_path / "encoder_hf", tmp_path / "pretrain.ckpt"):
        torch.manual_seed(0)
        network = init_encoder(tiny(), source)
        assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in network.encoder.state_dict().items())
        torch.manual_seed(0)
        assert all(torch.equal(a, b) for a, b in zip(network.up_layers.parameters(), tiny().up_layers.parameters()))


def test_load_network_errors_are_one_line(tmp_path):
    network = tiny()
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        load_network(network, tmp_path / "missing.pt")
    assert "\n" not in str(err.value)
    save_state_dict(ContrastiveModel(CTFMEncoder(init_filters=4)), tmp_path / "contrastive.pt")
    with pytest.raises(CheckpointError, match="different architecture"):
        load_network(network, tmp_path / "contrastive.pt")
    save_state_dict(tiny(out_channels=3), tmp_path / "three_classes.pt")
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_network(network, tmp_path / "three_classes.pt")
    save_state_dict(randomise(tiny()), tmp_path / "same.pt")
    assert load_network(tiny(), tmp_path / "same.pt") is not None


def test_training_metric_input_takes_the_full_resolution_head():
    logits = torch.zeros(2, 3, 4, 4, 4)
    logits[:, 2] = 1
    pred, label = labels_and_reference({"pred": [logits, logits[:, :, ::2]], "label": torch.ones(2, 1, 4, 4, 4)})
    assert pred.shape == (2, 1, 4, 4, 4) and (pred == 2).all() and label.shape == (2, 1, 4, 4, 4)


def test_class_metrics_equal_monai_on_one_hot_volumes():
    g = torch.Generator().manual_seed(0)
    reference = torch.zeros(24, 20, 16, dtype=torch.long)
    pred = torch.zeros_like(reference)
    reference[4:14, 3:12, 2:10] = 1
    pred[5:15, 3:13, 2:9] = 1
    reference[15:20, 12:18, 8:14] = 2
    pred[16:21, 12:17, 9:14] = 2
    reference[1:3, 1:3, 1:3] = 3  # missed
    pred[20:22, 1:3, 1:3] = 4  # not in the reference
    pred[(torch.rand(pred.shape, generator=g) < 0.02) & (pred == 0)] = 1  # speckle far from the surface
    spacing = (1.5, 1.0, 3.0)
    mine = class_metrics(pred, reference, [1, 2, 3, 4, 5], spacing)
    p, r = one_hot(pred[None, None], 6), one_hot(reference[None, None], 6)
    dice = DiceMetric(include_background=False, reduction="none")(p, r)[0]
    distance = SurfaceDistanceMetric(include_background=False, symmetric=True, reduction="none")(p, r, spacing=list(spacing))[0]
    for c in (1, 2, 3):
        assert mine[c][0] == pytest.approx(float(dice[c - 1]), abs=1e-6)
        assert mine[c][1] == pytest.approx(float(distance[c - 1]), abs=1e-5)
    assert np.isnan(mine[4][0]) and np.isinf(mine[4][1])  # predicted only: Dice ignored, distance inf
    assert mine[3][0] == 0 and np.isinf(mine[3][1])  # missed
    assert np.isnan(mine[5][0]) and np.isnan(mine[5][1])  # in neither


def _case(labels, name):
    tensor = MetaTensor(torch.as_tensor(labels)[None].float(), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    tensor.meta["filename_or_obj"] = name
    return tensor


def test_report_writes_csv_json_prints_and_feeds_metadata(tmp_path, capsys):
    reference = np.zeros((10, 10, 6), np.int64)
    reference[2:6, 2:6, 1:4] = 5
    reference[6:9, 6:9, 2:5] = 1
    pred = reference.copy()
    pred[2:4, 2:6, 1:4] = 0
    report = SegmentationReport(tmp_path / "eval", {1: "spleen", 5: "liver", 7: "pancreas"})
    report.add_case(_case(pred, "a.nii.gz"), _case(reference, "a.nii.gz"))
    summary = report.complete()
    printed = capsys.readouterr().out
    assert "liver" in printed and "spleen" in printed and "pancreas" not in printed
    assert summary["num_classes_present"] == 2 and summary["per_class_dice"] == {"spleen": 1.0, "liver": pytest.approx(2 / 3, abs=1e-4)}
    assert summary["mean_dice"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)
    rows = list(csv.reader(open(tmp_path / "eval" / "per_class_metrics.csv")))
    assert rows[0] == ["class_id", "class_name", "cases", "dice", "mean_surface_distance_mm"]
    assert [r[1] for r in rows[1:-1]] == ["spleen", "liver", "pancreas"] and rows[3][3] == ""
    assert rows[-1][0] == "mean" and float(rows[-1][3]) == summary["mean_dice"]
    confusion = [(r["reference_name"], r["predicted_name"], int(r["voxels"]), float(r["fraction_of_reference"]))
                 for r in csv.DictReader(open(tmp_path / "eval" / "confusion.csv"))]
    assert confusion == [
        ("background", "background", 10 * 10 * 6 - 48 - 27, 1.0),
        ("spleen", "spleen", 27, 1.0),
        ("liver", "background", 24, 0.5),
        ("liver", "liver", 24, 0.5),
    ]
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"version": "0.1.0"}))
    record_eval_metrics(tmp_path / "eval" / "summary.json", metadata)
    recorded = json.loads(metadata.read_text())["eval_metrics"]
    assert recorded["mean_dice"] == summary["mean_dice"] and recorded["per_class_dice"] == summary["per_class_dice"]
    assert f"Dice {summary['mean_dice']}" in printed


def test_report_draws_reference_over_prediction_on_the_ct(tmp_path):
    source = sample_path("example_ct_sm.nii.gz")
    affine = torch.as_tensor(nib.load(source).affine)
    reference = torch.as_tensor(np.asanyarray(nib.load(sample_path("example_seg.nii.gz")).dataobj).astype(np.int64))
    pred = torch.where(reference == 5, 0, reference)  # the liver missed

    def case(labels):
        tensor = MetaTensor(labels[None].float(), affine=affine)
        tensor.meta["filename_or_obj"] = str(source)
        return tensor

    report = SegmentationReport(tmp_path / "eval", totalseg_classes(), images=True)
    report.add_case(case(pred), case(reference))
    png = tmp_path / "eval" / "example_ct_sm_eval.png"
    image = plt.imread(png)
    assert image.shape[0] > 600 and image.shape[1] > 800  # two rows of three planes and a legend
    assert report.summarise()["per_class_dice"]["liver"] == 0.0
    off_grid = MetaTensor(reference[None, ::2].float(), affine=affine)
    off_grid.meta["filename_or_obj"] = str(source)
    with pytest.raises(CTFMError, match="example_ct_sm.nii.gz: the evaluated label maps are not on this CT"):
        report.add_case(off_grid, off_grid)


def test_writer_is_all_or_nothing(tmp_path, monkeypatch):
    ct = nib.load(sample_path("example_ct_sm.nii.gz"))
    labels = np.asanyarray(nib.load(sample_path("example_seg.nii.gz")).dataobj)
    pred = MetaTensor(torch.as_tensor(labels)[None].float(), affine=torch.as_tensor(ct.affine))
    pred.meta["filename_or_obj"] = str(sample_path("example_ct_sm.nii.gz"))
    writer = WriteSegmentationd("pred", tmp_path / "out", {5: "liver"})
    written = writer({"pred": pred})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["example_ct_sm_seg.nii.gz", "example_ct_sm_seg.png"]
    out = nib.load(tmp_path / "out" / "example_ct_sm_seg.nii.gz")
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(out.dataobj), labels)
    assert np.allclose(out.affine, ct.affine) and written["pred"] is pred

    def broken(*args, **kwargs):
        raise RuntimeError("preview failed")

    monkeypatch.setattr("ctfm.preview.render_preview", broken)
    with pytest.raises(RuntimeError):
        WriteSegmentationd("pred", tmp_path / "second", {})({"pred": pred})
    assert not any(p for p in (tmp_path / "second").iterdir())  # no label map without its preview, no temporaries


def test_preprocessing_survives_monai_labels_image_path_sibling(tmp_path):
    """monai 1.6.1's Spacingd calls .update() on a string 'image_path'; the wrapper sets it aside."""
    shutil.copy(sample_path("example_ct_sm.nii.gz"), tmp_path / "ct.nii.gz")
    path = str(tmp_path / "ct.nii.gz")
    preprocess = CTFMPreprocessd("image", spacing=(6.0, 6.0, 6.0))
    load = LoadImaged("image", ensure_channel_first=True, image_only=True)
    with pytest.raises(Exception):  # the MONAI behaviour this guards against
        Compose([load, preprocess])({"image": path, "image_path": path})
    out = Compose([load, HideStringSiblingsd("image", preprocess)])({"image": path, "image_path": path})
    assert out["image_path"] == path and out["image"].shape[1] == 15  # 30 slices of 3 mm at 6 mm
    inverted = HideStringSiblingsd("image", preprocess).inverse({"image": out["image"]})
    assert inverted["image"].shape == (1, 122, 101, 30)


def test_inline_composes_lets_cachedataset_cache_the_nested_preprocessing():
    nested = Compose([LoadImaged("image"), CTFMPreprocessd("image", spacing=(3, 3, 3))])
    flat = inline_composes(nested)
    assert nested.get_index_of_first(lambda t: isinstance(t, Compose)) == 1
    assert not any(isinstance(t, Compose) for t in flat.transforms) and len(flat.transforms) == 5


@pytest.mark.parametrize("source, spacing, crop", [("example_ct_dicom", (3.0, 3.0, 3.0), True), ("example_ct_sm.nii.gz", (2.5, 1.7, 4.1), False)])
def test_labels_to_input_grid_equals_invertd_without_float_copies(source, spacing, crop):
    from monai.transforms import Invertd

    from ctfm.ct_io import LoadCTd
    from ctfm.segmentation.outputs import LabelsToInputGridd

    preprocessing = Compose([LoadCTd("image"), CTFMPreprocessd("image", spacing=spacing, crop_foreground=crop)])
    data = preprocessing({"image": str(sample_path(source))})
    image = data["image"]
    labels = (torch.arange(image[0].numel()) // 7 % 118).reshape(image.shape).to(torch.uint8)  # many boundaries
    pred = MetaTensor(labels).copy_meta_from(image)
    expected = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=True)({**data, "pred": pred})["pred"]
    mapped = LabelsToInputGridd("pred")({"pred": pred})["pred"]
    assert mapped.dtype == torch.uint8 and mapped.shape == expected.shape
    assert torch.equal(mapped.as_tensor().long(), expected.as_tensor().round().long())
    assert np.allclose(mapped.affine, expected.affine, atol=1e-5) and mapped.applied_operations == []


def test_inference_config_runs_the_way_monai_label_calls_it(tmp_path):
    """MONAI Label: instantiate network_def and load models/model.pt itself, then preprocessing (with its
    'image_path' string beside 'image'), inferer, postprocessing; no writer."""
    from monai.bundle import ConfigParser

    from ctfm.networks import TOTALSEG_NUM_CLASSES

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "ctfm_segmentation" / "configs" / "inference.json"))
    parser["bundle_root"] = str(tmp_path)
    parser["init_filters"] = 4
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(randomise(CTFMSegResNetDS(init_filters=4)).state_dict())
    path = str(sample_path("example_ct_sm.nii.gz"))
    pre = parser.get_parsed_content("preprocessing")
    data = Compose(list(pre.transforms))({"image": path, "image_path": path})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network.eval())[0]
    out = parser.get_parsed_content("postprocessing")(data)
    assert out["pred"].shape == (1, 122, 101, 30) and int(out["pred"].max()) < TOTALSEG_NUM_CLASSES
    assert np.allclose(out["pred"].affine, nib.load(path).affine, atol=1e-4)
    assert parser.get_parsed_content("device") is not None and not list(tmp_path.iterdir())


def test_label_values_outside_the_classes_are_refused_naming_the_file(tmp_path):
    from monai.data import MetaTensor

    from ctfm.segmentation.data import RemapLabelsd

    label = MetaTensor(torch.tensor([[[[0, 3], [5, 200]]]]), meta={"filename_or_obj": str(tmp_path / "labels.nii.gz")})
    assert RemapLabelsd("label", num_classes=201)({"label": label})["label"] is label
    with pytest.raises(CTFMError, match=r"labels.nii.gz: label values 200 outside the 118 classes 0..117"):
        RemapLabelsd("label", num_classes=118)({"label": label})
    assert RemapLabelsd("label", mapping={200: 1}, num_classes=2)({"label": label})["label"].max() == 1


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    from monai.data import MetaTensor

    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), source)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    pred = MetaTensor(torch.ones(1, 4, 4, 4), affine=torch.eye(4), meta={"filename_or_obj": str(source)})
    with pytest.raises(CTFMError, match="cannot write outputs") as err:
        WriteSegmentationd(output_dir=blocked / "out", preview=False)({"pred": pred})
    assert "\n" not in str(err.value)
