"""The ctfm_segmentation bundle end to end through ``python -m monai.bundle run`` and ``torchrun``, on CPU.

Inference and evaluation use the shipped weights; training starts from a tiny pre-training export.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ctfm.checkpoint import save_hf_folder, save_state_dict
from ctfm.networks.encoder import CTFMEncoder
from ctfm.sample_data import sample_path, totalseg_classes
from ctfm.networks import CTFMSegResNetDS
from ctfm.weights import load as load_network

from bundle_runs import ENV, bundle_runner, error_line  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ctfm_segmentation"
CONFIGS = BUNDLE / "configs"
TINY_TRAIN = {"init_filters": 4, "crop_size": "[16,64,64]", "num_workers": 0, "warmup_iterations": 0, "learning_rate": 0.003}


#: The second tier: bundles run in subprocesses (and under torchrun).
pytestmark = pytest.mark.slow


run_bundle = bundle_runner(CONFIGS)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A pre-training export (Hugging Face folder) of a width-4 encoder."""
    torch.manual_seed(0)
    return save_hf_folder(CTFMEncoder(init_filters=4), tmp_path_factory.mktemp("pretrain") / "encoder_hf")


def test_inference_on_the_sample_ct_writes_label_map_and_preview(tmp_path):
    """The README's first command, from the repository root with no --bundle_root: the shipped weights are found."""
    run_bundle(["inference.json"], cwd=BUNDLE.parents[1], output_dir=tmp_path, datalist="example_ct.nii.gz")
    source = nib.load(sample_path("example_ct.nii.gz"))
    out = nib.load(tmp_path / "example_ct_seg.nii.gz")
    assert out.shape == source.shape and np.allclose(out.affine, source.affine, atol=1e-4)
    labels = np.asanyarray(out.dataobj)
    assert out.get_data_dtype() == np.uint8 and labels.max() <= 117
    liver = np.count_nonzero(labels == 5)
    assert liver > 1000  # the shipped weights find a liver (about 38k voxels in TotalSegmentator's labels)
    assert (tmp_path / "example_ct_seg.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example_ct_seg.nii.gz", "example_ct_seg.png"]


def test_dicom_series_in_gives_a_dicom_seg_with_one_segment_per_label(tmp_path):
    run_bundle(["inference.json"], bundle_root=BUNDLE, output_dir=tmp_path, datalist="example_ct_dicom")
    labels = np.asanyarray(nib.load(tmp_path / "example_ct_dicom_seg.nii.gz").dataobj)
    seg = pydicom.dcmread(tmp_path / "example_ct_dicom_seg.dcm")
    present = [int(v) for v in np.unique(labels) if v]
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == len(present) > 0
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [totalseg_classes()[v] for v in present]
    assert labels.shape == (512, 512, 20) and (tmp_path / "example_ct_dicom_seg.png").is_file()


def test_evaluation_on_the_held_out_series_matches_metadata(tmp_path):
    proc = run_bundle(["train.json", "evaluate.json"], bundle_root=BUNDLE, output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "liver" in proc.stdout and "mean over" in proc.stdout
    assert summary["cases"] == [str(sample_path("example_ct_dicom"))]
    metadata = json.loads((CONFIGS / "metadata.json").read_text())["eval_metrics"]
    assert metadata["mean_dice"] == summary["mean_dice"] and metadata["per_class_dice"] == summary["per_class_dice"]
    assert (tmp_path / "per_class_metrics.csv").read_text().splitlines()[-1].startswith("mean,")
    assert (tmp_path / "example_ct_dicom_eval.png").stat().st_size > 10_000  # reference over prediction
    confusion = list(csv.DictReader(open(tmp_path / "confusion.csv")))
    for name in ("liver", "spleen"):  # the confusion counts give back the reported Dice
        both = sum(int(r["voxels"]) for r in confusion if r["reference_name"] == r["predicted_name"] == name)
        reference = sum(int(r["voxels"]) for r in confusion if r["reference_name"] == name)
        predicted = sum(int(r["voxels"]) for r in confusion if r["predicted_name"] == name)
        assert 2 * both / (reference + predicted) == pytest.approx(summary["per_class_dice"][name], abs=1e-4)


@pytest.mark.parametrize(
    "case",
    ["two_d", "missing_weights", "other_architecture", "not_a_ct"],
)
def test_bad_inputs_end_with_one_line_and_no_output(tmp_path, case):
    out = tmp_path / "out"
    save_state_dict(CTFMSegResNetDS(init_filters=4), tmp_path / "model.pt")
    overrides = {"bundle_root": BUNDLE, "output_dir": out, "init_filters": 4, "ckpt_path": tmp_path / "model.pt"}
    if case == "two_d":
        path = tmp_path / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), path)
        overrides["datalist"] = path
    elif case == "missing_weights":
        overrides["ckpt_path"] = tmp_path / "nowhere" / "model.pt"
    elif case == "other_architecture":
        save_state_dict(CTFMEncoder(init_filters=8), tmp_path / "encoder.pt")
        overrides["ckpt_path"] = tmp_path / "encoder.pt"
    else:
        path = tmp_path / "notes.nii.gz"
        path.write_text("not an image")
        overrides["datalist"] = path
    line = error_line(run_bundle(["inference.json"], check=False, **overrides))
    expected = {"two_d": "slice.nii.gz", "missing_weights": "model.pt", "other_architecture": "encoder.pt", "not_a_ct": "notes.nii.gz"}
    assert expected[case] in line
    assert not out.exists() or not any(out.iterdir())


def test_training_data_with_mismatched_label_is_one_line(tmp_path, tiny_encoder):
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(sample_path("example_ct.nii.gz")), "label": str(sample_path("example_seg.nii.gz"))}]))
    proc = run_bundle(["train.json"], check=False, bundle_root=tmp_path / "run", dataset_dir=datalist, encoder_weights=tiny_encoder, **TINY_TRAIN)
    line = error_line(proc)
    assert "example_seg.nii.gz" in line and "example_ct.nii.gz" in line
    assert not (tmp_path / "run" / "models").exists()


def test_train_from_the_pretraining_export_then_infer_with_the_result(tmp_path, tiny_encoder):
    run_bundle(["train.json"], bundle_root=tmp_path, encoder_weights=tiny_encoder, epoch_length=3, max_epochs=1, **TINY_TRAIN)
    weights = tmp_path / "models" / "model.pt"
    network = load_network(CTFMSegResNetDS(init_filters=4), weights)
    assert (tmp_path / "models" / "checkpoints" / "checkpoint_iteration=3.pt").is_file()
    assert not torch.equal(network.encoder.conv_init.weight, CTFMEncoder(init_filters=4).conv_init.weight)
    run_bundle(
        ["inference.json"], bundle_root=tmp_path, init_filters=4, output_dir=tmp_path / "out",
        datalist="example_ct_sm.nii.gz", write_preview=False,
    )
    assert (tmp_path / "out" / "example_ct_sm_seg.nii.gz").is_file()


def test_training_dice_rises_on_an_msd_style_task(tmp_path, tiny_encoder):
    """MSD layout with a task label picked by override: liver only (2 classes), so Dice moves within 40 steps."""
    pair = {"image": str(sample_path("example_ct_sm.nii.gz")), "label": str(sample_path("example_seg.nii.gz"))}
    labels = {"0": "background", **{str(k): v for k, v in totalseg_classes().items()}}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "training": [pair]}))
    run_bundle(
        ["train.json"], bundle_root=tmp_path, encoder_weights=tiny_encoder, data_layout="msd",
        dataset_dir=tmp_path, task_labels="[5]", epoch_length=10, max_epochs=4, **TINY_TRAIN,
    )
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    dice = [e.value for e in events.Scalars("train_mean_dice")]
    assert len(dice) == 4 and dice[-1] > dice[0] + 0.1 and dice[-1] > 0.3, dice


def test_multi_gpu_train_runs_with_torchrun_two_cpu_processes(tmp_path, tiny_encoder):
    runner = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531")
    run_bundle(
        ["train.json", "multi_gpu_train.json"], runner=runner, bundle_root=tmp_path, encoder_weights=tiny_encoder,
        epoch_length=2, max_epochs=1, **TINY_TRAIN,
    )
    assert (tmp_path / "models" / "model.pt").is_file()
    load_network(CTFMSegResNetDS(init_filters=4), tmp_path / "models" / "model.pt")


def test_a_copied_bundle_segments_a_zoo_dataset_dir_from_another_directory(tmp_path):
    """The model zoo's layout and command: `--dataset_dir DIR` with imagesTs/*.nii.gz, no --bundle_root, run from
    elsewhere on a copy of the bundle: DIR's CTs are segmented into the copy's own eval/ with the copy's weights."""
    copy = tmp_path / "zoo" / "ctfm_segmentation"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval", "runs"))
    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    shutil.copy(sample_path("example_ct_sm.nii.gz"), data / "imagesTs" / "case_a.nii.gz")
    shutil.copy(sample_path("example_ct_sm.nii.gz"), data / "imagesTs" / "case_b.nii.gz")
    (tmp_path / "elsewhere").mkdir()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(copy / "configs" / "inference.json"),
           "--dataset_dir", str(data), "--write_preview", "False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = sorted(p.relative_to(copy / "eval").as_posix() for p in (copy / "eval").rglob("*") if p.is_file())
    assert outputs == ["imagesTs/case_a_seg.nii.gz", "imagesTs/case_b_seg.nii.gz"]
    assert str(copy / "models" / "model.pt") in proc.stdout + proc.stderr  # the copy's own weights
    assert not (BUNDLE / "eval" / "imagesTs").exists() and not any((tmp_path / "elsewhere").iterdir())


def test_a_misspelt_id_stops_the_run_in_one_line(tmp_path):
    proc = run_bundle(["inference.json"], check=False, dataset_dirr=tmp_path, output_dir=tmp_path / "out")
    assert error_line(proc) == f"error: {CONFIGS / 'inference.json'}: no config of this run defines --dataset_dirr (a misspelt id is otherwise ignored)"
    assert not (tmp_path / "out").exists()


def test_training_in_the_bundle_folder_cannot_replace_the_shipped_weights(tmp_path, tiny_encoder):
    """On a copy of the bundle (same folder name, so its shipped files are the table's), not in the repository."""
    copy = tmp_path / "ctfm_segmentation"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval", "runs"))
    shipped = (copy / "models" / "model.pt").read_bytes()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(copy / "configs" / "train.json"),
           *[f"--{k}={v}" for k, v in {**TINY_TRAIN, "encoder_weights": tiny_encoder, "epoch_length": 1, "max_epochs": 1}.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert "shipped weights would be replaced" in error_line(proc) and str(copy / "models" / "model.pt") in proc.stderr
    assert (copy / "models" / "model.pt").read_bytes() == shipped and not (copy / "models" / "checkpoints").exists()
