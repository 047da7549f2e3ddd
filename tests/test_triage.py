"""The triage building blocks in-process: classifier, stem adaptation, head-CT recipes, embedding store, probe,
few-shot, outputs and saliency (the bundle runs are in test_triage_bundle.py)."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctfm.checkpoint import CheckpointError, save_hf_folder
from ctfm.embedding_store import EmbeddingStore, extract_embeddings
from ctfm.errors import CTFMError
from ctfm.networks import CTFMClassifier, CTFMEncoder, build_encoder
from ctfm.networks.encoder import adapt_input_conv
from ctfm.phantom import head_phantom
from ctfm.transforms import FMCT_HEAD_WINDOWS, HEAD_CT_WINDOWS, CheckHeadCTd, HeadCTGridd, HUWindowsd
from ctfm.triage.datasets import label_fraction_indices
from ctfm.triage.probe import few_shot, fit_linear_probe, label_efficiency, mean_auroc
from ctfm.triage.saliency import fold_windows, gradcam, gradcam_layer
from ctfm.weights import init_encoder, load

from conftest import randomise, tiny_vit_config  # noqa: E402


def as_meta(phantom):
    return MetaTensor(torch.as_tensor(phantom.image)[None], affine=torch.as_tensor(phantom.affine), meta={"filename_or_obj": "phantom.nii.gz"})


# --- network --------------------------------------------------------------------------------------------------


def test_ctfm_head_and_linear_head():
    mlp = CTFMClassifier(3, {"init_filters": 4})
    assert [type(m).__name__ for m in mlp.head] == ["Linear", "ReLU", "Linear"]
    assert (mlp.head[0].in_features, mlp.head[0].out_features, mlp.head[2].out_features) == (64, 256, 3)
    linear = CTFMClassifier(3, {"init_filters": 4}, head="linear")
    assert [type(m).__name__ for m in linear.head] == ["Linear"]
    x = torch.rand(2, 1, 16, 32, 32)
    assert mlp(x).shape == linear(x).shape == (2, 3)
    with pytest.raises(ValueError, match="head 'conv'"):
        CTFMClassifier(3, head="conv")


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_adapted_stem_gives_the_one_channel_output_for_equal_channels(channels):
    torch.manual_seed(0)
    one = CTFMEncoder(init_filters=4).eval()
    many = CTFMEncoder(init_filters=4, in_channels=channels).eval()
    state = dict(one.state_dict())
    state["conv_init.weight"] = adapt_input_conv(state["conv_init.weight"], channels)
    many.load_state_dict(state)
    x = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(many.embed(x.repeat(1, channels, 1, 1, 1)), one.embed(x), rtol=1e-5, atol=1e-6)
    summed = adapt_input_conv(state["conv_init.weight"], 1)
    torch.testing.assert_close(summed, one.state_dict()["conv_init.weight"])


def test_fine_tuning_a_three_window_classifier_from_a_one_channel_encoder(tmp_path):
    """FM-CT's windows as channels on CT-FM's one-channel encoder: init_encoder adapts the stem; loading a whole
    network of another channel count stays refused."""
    torch.manual_seed(0)
    encoder = CTFMEncoder(init_filters=4).eval()
    save_hf_folder(encoder, tmp_path / "encoder_hf")
    net = init_encoder(CTFMClassifier(2, {"init_filters": 4, "in_channels": 3}), tmp_path / "encoder_hf").eval()
    x = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(net.embed(x.repeat(1, 3, 1, 1, 1)), encoder.embed(x), rtol=1e-5, atol=1e-6)
    torch.save(CTFMClassifier(2, {"init_filters": 4}).state_dict(), tmp_path / "one_channel.pt")
    with pytest.raises(CheckpointError, match="differ in shape"):
        load(CTFMClassifier(2, {"init_filters": 4, "in_channels": 3}), tmp_path / "one_channel.pt")


def test_vit_classifier_adapts_the_patch_embedding_and_reads_saliency_off_the_token_map(tmp_path):
    """FM-CT's backbone under the same classifier: a one-channel ViT initialises a three-window one (the patch-embedding
    convolution adapts like the CNN's first convolution), and Grad-CAM reads the ViT's token map."""
    vit = tiny_vit_config(patch_size=[8, 8, 8])
    torch.manual_seed(0)
    one = randomise(build_encoder(vit))
    save_hf_folder(one, tmp_path / "vit_hf")
    net = init_encoder(CTFMClassifier(2, {**vit, "in_channels": 3}), tmp_path / "vit_hf").eval()
    x = torch.rand(1, 1, 24, 32, 40)
    torch.testing.assert_close(net.embed(x.repeat(1, 3, 1, 1, 1)), one.embed(x), rtol=1e-5, atol=1e-5)
    assert gradcam_layer(net) == "encoder.token_map"
    heat = gradcam(net, x.repeat(1, 3, 1, 1, 1)[0], 1)
    assert heat.shape == (24, 32, 40) and heat.max() > heat.min()
    config = json.loads((save_hf_folder(net, tmp_path / "classifier_hf") / "config.json").read_text())
    assert config["model_type"] == "ctfm_vit" and config["in_channels"] == 3 and config["num_classes"] == 2
    again = load(CTFMClassifier(2, {**vit, "in_channels": 3}), tmp_path / "classifier_hf")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_classifier_round_trips_through_a_hugging_face_folder(tmp_path):
    net = CTFMClassifier(4, {"init_filters": 4}, head="linear")
    save_hf_folder(net, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_classes"] == 4
    again = load(CTFMClassifier(4, {"init_filters": 4}, head="linear"), tmp_path / "hf")
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


# --- recipes --------------------------------------------------------------------------------------------------


def test_ctfm_recipe_stacks_four_windows_along_s():
    data = HeadCTGridd("image")({"image": as_meta(head_phantom())})
    assert data["image"].shape == (1, 48, 128, 128)
    hu = data["image"].clone()
    stacked = HUWindowsd("image", HEAD_CT_WINDOWS, stack="S")(data)["image"]
    assert stacked.shape == (1, 192, 128, 128)
    for i, (low, high) in enumerate(HEAD_CT_WINDOWS):
        torch.testing.assert_close(stacked[:, 48 * i : 48 * (i + 1)], ((hu - low) / (high - low)).clamp(0, 1))


def test_fmct_recipe_resizes_the_head_and_stacks_windows_as_channels():
    grid = HeadCTGridd("image", orientation="RAS", spacing=(1, 1, 1), spatial_size=(96, 96, 96), size_mode="resize")
    data = HUWindowsd("image", FMCT_HEAD_WINDOWS, stack="channel")(grid({"image": as_meta(head_phantom())}))
    assert data["image"].shape == (3, 96, 96, 96)
    assert 0.0 <= float(data["image"].min()) and float(data["image"].max()) <= 1.0
    # level/width 40/80, 80/200, 600/2800
    assert FMCT_HEAD_WINDOWS == ((0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0))


def test_a_body_ct_is_refused_as_not_a_head():
    from ctfm.phantom import body_phantom

    body = body_phantom()
    with pytest.raises(CTFMError, match=r"phantom.nii.gz: not a head CT: the body is \d+ mm wide"):
        CheckHeadCTd()({"image": as_meta(body)})
    CheckHeadCTd()({"image": as_meta(head_phantom())})


# --- embedding store ------------------------------------------------------------------------------------------


def test_embedding_store_resumes_reports_failures_and_separates_encoders(tmp_path):
    calls = []

    def transform(item):
        if item["image"] == "broken":
            raise CTFMError("broken: not a CT")
        return {"image": torch.full((1, 4), float(item["value"]))}

    def embed(x):
        calls.append(float(x.mean()))
        return x.flatten(1) * 2

    store = EmbeddingStore(tmp_path, {"weights": "a"})
    items = [{"id": f"case/{i}", "image": f"ct{i}", "value": i} for i in range(3)] + [{"id": "bad", "image": "broken"}]
    report = extract_embeddings(store, items, transform, embed)
    assert report.embedded == ["case/0", "case/1", "case/2"] and report.failed == {"bad": "broken: not a CT"}
    np.testing.assert_array_equal(store.matrix(["case/2", "case/0"]), [[4.0] * 4, [0.0] * 4])
    again = extract_embeddings(store, items[:3], transform, embed)
    assert again.skipped == ["case/0", "case/1", "case/2"] and len(calls) == 3
    assert store.ids() == ["case/0", "case/1", "case/2"]
    assert not list(tmp_path.rglob("*.tmp"))
    other = EmbeddingStore(tmp_path, {"weights": "b"})
    assert other.folder != store.folder and not other.has("case/0")
    with pytest.raises(CTFMError, match="NaN or Inf"):
        store.put("nan", torch.tensor([float("nan")]), "x")


# --- probe and few-shot ---------------------------------------------------------------------------------------


def separable(n, seed, dim=16):
    """Embeddings whose first coordinate carries finding 0 and second coordinate finding 1."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.4).astype(float)
    y[:2] = [[1, 0], [0, 1]]
    x = rng.normal(size=(n, dim))
    x[:, :2] += 3.0 * y
    return x, y


def test_linear_probe_and_few_shot_find_separable_findings():
    x_train, y_train = separable(60, 0)
    x_test, y_test = separable(40, 1)
    probe = fit_linear_probe(x_train, y_train)
    assert mean_auroc(y_test, probe.predict_proba(x_test)) > 0.95
    shuffled = fit_linear_probe(x_train, np.random.default_rng(2).permutation(y_train))
    assert mean_auroc(y_test, shuffled.predict_proba(x_test)) < 0.8
    rows = few_shot(x_train, y_train, x_test, y_test, ["a", "b"], shots=(1, 4), seeds=range(5))
    assert [(r["finding"], r["shots"], r["runs"]) for r in rows] == [("a", 1, 5), ("a", 4, 5), ("b", 1, 5), ("b", 4, 5)]
    assert all(r["auroc_mean"] > 0.8 for r in rows if r["shots"] == 4)
    logistic = few_shot(x_train, y_train, x_test, y_test, ["a", "b"], shots=(4,), seeds=range(3), method="logistic")
    assert all(r["auroc_mean"] > 0.65 for r in logistic)  # 8 cases in 16 dimensions: weaker than prototypes


def test_label_efficiency_subsamples_keep_both_classes_of_every_finding():
    x_train, y_train = separable(100, 3)
    x_test, y_test = separable(40, 4)
    for seed in range(5):
        chosen = label_fraction_indices(y_train, 0.02, seed)
        assert len(chosen) >= 2 and all(len(np.unique(y_train[chosen, f])) == 2 for f in range(2))
    rows = label_efficiency(x_train, y_train, x_test, y_test, fractions=(0.05, 1.0), seeds=range(3))
    assert [r["labels"] for r in rows][1] == 100 and rows[0]["labels"] < 10
    assert rows[1]["runs"] == 1 and rows[1]["auroc_mean"] > 0.95


# --- outputs and saliency -------------------------------------------------------------------------------------


def test_fold_windows_averages_the_stacked_segments():
    volume = np.concatenate([np.full((2, 3, 3), float(i)) for i in range(4)])
    np.testing.assert_array_equal(fold_windows(volume, 4), np.full((2, 3, 3), 1.5))
    with pytest.raises(ValueError):
        fold_windows(volume, 3)


def test_gradcam_is_a_map_in_unit_range_on_the_input_grid():
    torch.manual_seed(0)
    heat = gradcam(CTFMClassifier(2, {"init_filters": 4}), torch.rand(1, 32, 32, 32), 1)
    assert heat.shape == (32, 32, 32) and 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > heat.min()


def test_write_triaged_writes_json_csv_and_saliency_and_keeps_inputs_apart(tmp_path):
    from ctfm.triage.outputs import WriteTriaged

    torch.manual_seed(0)
    net = CTFMClassifier(2, {"init_filters": 4})
    writer = WriteTriaged(findings=["a", "b"], output_dir=tmp_path / "out", data_root_dir=tmp_path, saliency_network=net,
                          window_stack="S", n_windows=2)
    image = MetaTensor(torch.rand(1, 32, 32, 32), affine=torch.eye(4))
    for name in ("s1/ct.nii.gz", "s2/ct.nii.gz"):
        pred = MetaTensor(torch.tensor([0.25, 0.75]), meta={"filename_or_obj": str(tmp_path / name)})
        writer({"pred": pred, "image": image})
    record = json.loads((tmp_path / "out" / "s1" / "ct_triage.json").read_text())
    assert record["findings"] == {"a": 0.25, "b": 0.75} and record["saliency_finding"] == "b"
    assert (tmp_path / "out" / "s2" / "ct_saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(tmp_path / "out" / "triage.csv")))
    assert [r["source"].endswith(f"s{i}/ct.nii.gz") for i, r in zip((1, 2), rows)] == [True, True]
    flat = WriteTriaged(findings=["a", "b"], output_dir=tmp_path / "flat")  # no data_root_dir: both are "ct"
    for name in ("s1/ct.nii.gz", "s2/ct.nii.gz"):
        pred = MetaTensor(torch.tensor([0.1, 0.2]), meta={"filename_or_obj": str(tmp_path / name)})
        if name.startswith("s1"):
            flat({"pred": pred, "image": image})
            continue
        with pytest.raises(CTFMError, match="output of another input"):
            flat({"pred": pred, "image": image})
    assert json.loads((tmp_path / "flat" / "ct_triage.json").read_text())["source"].endswith("s1/ct.nii.gz")
    with pytest.raises(CTFMError, match="2 probabilities for 3 findings"):
        WriteTriaged(findings=["a", "b", "c"], output_dir=tmp_path / "o2")({"pred": pred, "image": image})


def test_the_test_set_is_held_out_from_training(tmp_path):
    from ctfm.triage.datasets import TriageCase, TriageDataset, held_out_test_set

    def dataset(source, *cases):
        return TriageDataset(("a",), tuple(TriageCase(i, p, str(tmp_path / img), {"a": float(n % 2)}) for n, (i, p, img) in enumerate(cases)), source)

    train = dataset("train.csv", ("c1", "p1", "1.nii.gz"), ("c2", "p2", "2.nii.gz"), ("c3", "p3", "3.nii.gz"))
    split = {"train": ["c1"], "validation": ["c2"], "test": ["c3"]}
    assert [c.id for c in held_out_test_set(train, split).cases] == ["c3"]  # the split's own test part
    external = dataset("test.csv", ("t1", "q1", "9.nii.gz"))
    assert held_out_test_set(train, split, external) is external
    with pytest.raises(CTFMError, match=r"test.csv: 1 image\(s\) of the test set are also in training"):
        held_out_test_set(train, split, dataset("test.csv", ("t1", "q1", "2.nii.gz")))
    with pytest.raises(CTFMError, match=r"test.csv: 1 patient\(s\) of the test set are also in training"):
        held_out_test_set(train, split, dataset("test.csv", ("t1", "p1", "8.nii.gz")))
    with pytest.raises(CTFMError, match="no test cases"):
        held_out_test_set(train, {"train": ["c1"], "validation": ["c2"], "test": []})


def test_mean_auroc_key_metric_scores_the_findings_it_can():
    from ignite.engine import Engine

    from ctfm.triage.evaluation import MeanAUROC

    batches = [  # finding 0 separable, finding 1 never positive (an EDH-like finding in a small validation split)
        [{"pred": torch.tensor([0.9, 0.2]), "label": torch.tensor([1.0, 0.0])}, {"pred": torch.tensor([0.1, 0.3]), "label": torch.tensor([0.0, 0.0])}],
        [{"pred": torch.tensor([0.8, 0.1]), "label": torch.tensor([1.0, 0.0])}],
    ]
    engine = Engine(lambda e, batch: batch)
    MeanAUROC(lambda out: ([o["pred"] for o in out], [o["label"] for o in out])).attach(engine, "val_auroc")
    assert engine.run(batches).metrics["val_auroc"] == 1.0
