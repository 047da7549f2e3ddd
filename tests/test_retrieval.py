"""ctfm_retrieval's building blocks in-process: metrics against hand-computed values, the 3D-MIR and OrganMNIST3D
readers on stand-ins in their exact layouts, the store's rows and merge, faiss indexes, queries by region, and
the four probing protocols on known answers (the bundle runs are in test_retrieval_bundle.py)."""


import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctfm.embedding_store import EmbeddingStore, extract_embeddings
from ctfm.errors import CTFMError
from ctfm.retrieval import index as index_module
from ctfm.retrieval.clustering import cluster_scores, organ_crops
from ctfm.retrieval.datasets import read_3dmir, read_organmnist3d
from ctfm.retrieval.evaluation import evaluate_3dmir, evaluate_organmnist
from ctfm.retrieval.extract import patch_centres_mm, pool, scan_ids
from ctfm.retrieval.index import RetrievalIndex, build_index, index_store
from ctfm.retrieval.metrics import (
    average_precision,
    average_precision_at_k,
    hit_rate_at_k,
    precision_at_k,
    rank_database,
    recall_at_k,
    summary,
)
from ctfm.retrieval.occlusion import occlusion_saliency
from ctfm.retrieval.query import crop_at, region_centre_mm, world_to_voxel
from ctfm.retrieval.semantic_search import search_structure
from ctfm.retrieval.test_retest import PERTURBATIONS, perturb, retest_cosines

# --- metrics ---------------------------------------------------------------------------------------------------

#: two queries' ranked relevance over five database items
RELEVANCE = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], float)


def test_metrics_equal_hand_computed_values():
    np.testing.assert_allclose(precision_at_k(RELEVANCE, 1), [1, 0])
    np.testing.assert_allclose(precision_at_k(RELEVANCE, 3), [2 / 3, 0])
    np.testing.assert_allclose(recall_at_k(RELEVANCE, 3), [1, 0])
    np.testing.assert_allclose(recall_at_k(RELEVANCE, 4), [1, 0.5])
    np.testing.assert_allclose(hit_rate_at_k(RELEVANCE, 3), [1, 0])
    # AP: query 0 relevant at ranks 1, 3 -> (1/1 + 2/3) / 2; query 1 at ranks 4, 5 -> (1/4 + 2/5) / 2
    np.testing.assert_allclose(average_precision(RELEVANCE), [(1 + 2 / 3) / 2, (1 / 4 + 2 / 5) / 2])
    # AP@3: query 0 -> (1 + 2/3) / min(3, 2); query 1 -> nothing in the top 3
    np.testing.assert_allclose(average_precision_at_k(RELEVANCE, 3), [(1 + 2 / 3) / 2, 0])
    s = summary(RELEVANCE, ks=(3,))
    assert s["queries"] == 2
    assert s["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2)
    assert s["P@3"] == pytest.approx(1 / 3) and s["HR@3"] == pytest.approx(0.5)


def test_rank_database_orders_by_cosine_and_by_distance():
    database = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0]])
    query = np.array([[1.0, 0.02]])
    assert rank_database(query, database, "cosine")[0].tolist() == [0, 1, 2]  # direction only
    assert rank_database(query, database, "euclidean")[0].tolist() == [0, 2, 1]  # (10, 1) is far away


# --- 3D-MIR and OrganMNIST3D stand-ins -------------------------------------------------------------------------

MIR_HEADER = "name,organ,max_tumor_size,number_tumors,lesion_group,cancer_flag,CaptionV1,CaptionV2,CaptionV3\n"


@pytest.fixture
def mir(tmp_path):
    """3D-MIR's liver label file and splits, and an images folder holding (empty) MSD-named volumes."""
    images = tmp_path / "Task03_Liver" / "imagesTr"
    images.mkdir(parents=True)
    rows = [("liver_0.nii.gz", 2, 1), ("liver_1.nii.gz", 3, 1), ("liver_2.nii.gz", -1, 0), ("liver_3.nii.gz", 2, 1), ("liver_4.nii.gz", -1, 0)]
    text = MIR_HEADER + "".join(f'{n},liver,2.4,7,{g},{f},"A liver with ""tumors"".",b,c\n' for n, g, f in rows)
    (tmp_path / "liver_labels_and_captions.csv").write_text(text)
    (tmp_path / "liver_full_test_split.csv").write_text(",testing\n0,liver_0.nii.gz\n1,liver_2.nii.gz\n")
    (tmp_path / "liver_full_train_split.csv").write_text(",training\n0,liver_1.nii.gz\n1,liver_3.nii.gz\n2,liver_4.nii.gz\n")
    for name, _, _ in rows:
        (images / name).write_bytes(b"")
    return tmp_path


def test_3dmir_reader_and_metrics(mir):
    splits = [mir / "liver_full_test_split.csv", mir / "liver_full_train_split.csv"]
    cases = read_3dmir([mir / "liver_labels_and_captions.csv"], mir, splits)
    by_id = {c.id: c for c in cases}
    assert {c.id for c in cases if c.role == "query"} == {"liver_0.nii.gz", "liver_2.nii.gz"}
    assert by_id["liver_2.nii.gz"].lesion_flag == 0 and by_id["liver_1.nii.gz"].lesion_group == 3
    assert by_id["liver_0.nii.gz"].image.endswith("imagesTr/liver_0.nii.gz")
    # embeddings on a circle: liver_0 is nearest liver_3 (flag 1, group 2), then liver_1 (flag 1, group 3)
    angle = {"liver_0.nii.gz": 0.0, "liver_3.nii.gz": 0.1, "liver_1.nii.gz": 0.3, "liver_4.nii.gz": 2.0, "liver_2.nii.gz": 2.1}
    embeddings = {k: np.array([np.cos(a), np.sin(a)]) for k, a in angle.items()}
    rows = {r["target"]: r for r in evaluate_3dmir(cases, embeddings, ks=(1, 3))}
    # lesion flag: liver_0 ranks [3, 1, 4] -> rel [1, 1, 0]; liver_2 ranks [4, 1, 3] -> rel [1, 0, 0]
    assert rows["lesion_flag"]["P@1"] == 1.0
    assert rows["lesion_flag"]["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert rows["lesion_flag"]["mAP"] == pytest.approx((1.0 + 1.0) / 2)
    # lesion group: liver_0 (group 2) rel [1, 0, 0]; liver_2 (group -1) rel [1, 0, 0]
    assert rows["lesion_group"]["P@3"] == pytest.approx(1 / 3)
    assert rows["lesion_group"]["queries"] == 2 and rows["lesion_group"]["database"] == 3


def test_3dmir_leave_one_out_never_retrieves_the_query(mir):
    cases = read_3dmir(mir / "liver_labels_and_captions.csv", mir)
    embeddings = {c.id: np.array([1.0, float(i)]) for i, c in enumerate(cases)}  # angles 0, 45, 63, 72, 76 degrees
    row = evaluate_3dmir(cases, embeddings, ks=(1,))[0]
    assert row["queries"] == 5 and row["database"] == 5
    # nearest other case: 0->1, 1->2, 2->3, 3->4, 4->3; flags 1, 1, 0, 1, 0: only 0->1 shares its flag (itself: 1.0)
    assert row["target"] == "lesion_flag" and row["P@1"] == pytest.approx(0.2)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("cancer_flag", "flag"), "no column cancer_flag"),
    (lambda t: t.replace("liver_4.nii.gz,liver,2.4,7,-1,0", "liver_4.nii.gz,liver,2.4,7,-1,yes"), "line 6 .liver_4.nii.gz.: cancer_flag and lesion_group must be integers"),
    (lambda t: t + 'liver_9.nii.gz,liver,1,1,1,1,"a",b,c\n', "line 7: no image liver_9.nii.gz"),
    (lambda t: t + 'liver_0.nii.gz,liver,1,1,1,1,"a",b,c\n', "line 7: liver_0.nii.gz is labelled twice"),
])
def test_3dmir_bad_labels_are_one_line_naming_the_file(mir, edit, message):
    path = mir / "liver_labels_and_captions.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(CTFMError, match=message) as err:
        read_3dmir(path, mir)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def write_organmnist(path, size=28, per_split=(12, 4, 6), seed=0):
    """An OrganMNIST3D stand-in: MedMNIST's keys, uint8 cubes, (N, 1) labels of 3 classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), per_split):
        labels = np.arange(n) % 3
        images = np.zeros((n, size, size, size), np.uint8)
        for i, label in enumerate(labels):  # class c: a bright cube in octant c, plus noise
            c = slice(2 + 8 * label, 8 + 8 * label)
            images[i, c, c, c] = 200
            images[i] += rng.integers(0, 20, (size, size, size), dtype=np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None].astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def test_organmnist_reader_and_metrics(tmp_path):
    splits = read_organmnist3d(write_organmnist(tmp_path / "organmnist3d.npz"))
    images, labels = splits["test"]
    assert images.shape == (6, 1, 28, 28, 28) and images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    # an oracle embedding (the label one-hot) ranks every same-organ item first: P@k = 1 up to 4 (train has 4 per class)
    oracle = lambda x: np.stack([[v[0, 2 + 8 * c : 8 + 8 * c, 2 + 8 * c : 8 + 8 * c].mean() for c in range(3)] for v in x])
    row = evaluate_organmnist(splits, oracle, ks=(1, 4, 5))[0]
    assert row["P@1"] == 1.0 and row["P@4"] == 1.0 and row["P@5"] == pytest.approx(4 / 5)
    assert row["mAP"] == 1.0 and row["recall@4"] == 1.0 and row["database"] == 12


def test_organmnist_bad_files_are_one_line(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 28, 28, 28), np.uint8))
    with pytest.raises(CTFMError, match=r"bad.npz: not an OrganMNIST3D file: no train_images / train_labels"):
        read_organmnist3d(path)
    np.savez(path, **{f"{s}_{k}": (np.zeros((2, 30, 30, 30), np.uint8) if k == "images" else np.zeros((2, 1), np.int64))
                      for s in ("train", "val", "test") for k in ("images", "labels")})
    with pytest.raises(CTFMError, match=r"train_images has shape \(2, 30, 30, 30\)"):
        read_organmnist3d(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CTFMError, match="junk.npz: not a readable .npz"):
        read_organmnist3d(tmp_path / "junk.npz")


# --- store, extraction rows, index ---------------------------------------------------------------------------


def clustered(n, d=16, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 3
    labels = np.arange(n) % k
    return (centres[labels] + rng.standard_normal((n, d)) * 0.3).astype(np.float32), labels


def filled_store(tmp_path, n=12, patches=3):
    store = EmbeddingStore(tmp_path / "store", {"weights": "w"})
    x, _ = clustered(n * patches)
    for i in range(n):
        p = torch.from_numpy(x[i * patches : (i + 1) * patches])
        store.put(f"scan_{i:02d}", pool(p, "min"), f"/data/scan_{i:02d}.nii.gz",
                  {"patch_embeddings": p, "patch_centres_mm": torch.full((patches, 3), float(i))}, {"shape": [8, 8, 8]})
    return store, x


def test_store_rows_merge_and_open(tmp_path):
    store, x = filled_store(tmp_path)
    row = store.row("scan_03")
    assert row["source"] == "/data/scan_03.nii.gz" and row["info"] == {"shape": [8, 8, 8]}
    np.testing.assert_array_equal(row["patch_embeddings"], x[9:12])
    np.testing.assert_array_equal(row["embedding"], x[9:12].min(0))
    matrix, table = store.merge()
    assert store.ids() == [f"scan_{i:02d}" for i in range(12)]  # the merged matrix is not a row
    from safetensors.numpy import load_file

    merged = load_file(str(matrix))
    assert merged["embedding"].shape == (12, 16) and merged["patch_embeddings"].shape == (36, 16)
    assert merged["patch_rows"].tolist() == [i for i in range(12) for _ in range(3)]
    assert table.read_text().splitlines()[0] == "id,source,dim,n_patches,shape"
    assert EmbeddingStore.open(store.folder).fingerprint == store.fingerprint
    with pytest.raises(CTFMError, match="not an embedding store"):
        EmbeddingStore.open(tmp_path)
    with pytest.raises(CTFMError, match="NaN or Inf"):
        store.put("bad", torch.ones(16), "bad.nii.gz", {"patch_embeddings": torch.full((2, 16), float("nan"))})


def test_shards_are_disjoint_and_cover_every_item(tmp_path):
    items = [{"image": f"ct_{i}.nii.gz", "id": f"ct_{i}"} for i in range(7)]
    store = EmbeddingStore(tmp_path, {"weights": "w"})
    seen = []
    for rank in range(3):
        report = extract_embeddings(store, items, lambda d: {"image": torch.zeros(1, 2, 2, 2)}, lambda x: torch.ones(1, 4), shard=(rank, 3))
        seen.append(set(report.embedded))
    assert set.union(*seen) == {i["id"] for i in items} and sum(map(len, seen)) == 7


def test_scan_ids_are_paths_under_the_root_and_never_collide(tmp_path):
    items = [{"image": str(tmp_path / "a" / "ct.nii.gz")}, {"image": str(tmp_path / "b" / "ct.nii.gz")}]
    assert [i["id"] for i in scan_ids(items, tmp_path)] == ["a/ct", "b/ct"]
    with pytest.raises(CTFMError, match="its id 'ct' is also the id of"):
        scan_ids(items, None)


def test_patch_centres_follow_the_affine():
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    centres = patch_centres_mm(torch.tensor([[0, 0, 0], [4, 8, 8]]), (4, 8, 8), affine)
    np.testing.assert_allclose(centres, [[10 + 3 * 1.5, 20 + 3.5, 30 + 3.5], [10 + 3 * 5.5, 20 + 11.5, 30 + 11.5]])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_index_round_trip_finds_the_nearest_rows(tmp_path, kind, metric):
    store, x = filled_store(tmp_path)
    store.merge()
    info = index_store(store, tmp_path / "index", metric, kind, "scan")
    assert (info.kind, info.count, info.dim, info.fingerprint) == (kind, 12, 16, store.fingerprint)
    index = RetrievalIndex(tmp_path / "index")
    query = store.get("scan_05")
    hits = index.search(query[None], k=3)[0]
    assert hits["id"].iloc[0] == "scan_05" and hits["rank"].tolist() == [1, 2, 3]
    order = rank_database(query[None], store.matrix(store.ids()), metric)[0]
    assert hits["id"].tolist() == [store.ids()[i] for i in order[:3]]  # the exact answer, on this small store
    assert "scan_05" not in index.search(query[None], k=3, exclude=["scan_05"])[0]["id"].tolist()


def test_patch_index_rows_carry_scan_patch_and_place(tmp_path):
    store, x = filled_store(tmp_path)
    store.merge()
    index_store(store, tmp_path / "patches", level="patch")
    hits = RetrievalIndex(tmp_path / "patches").search(x[7][None], k=1)[0]
    assert hits.loc[0, ["id", "patch"]].tolist() == ["scan_02", 1] and hits.loc[0, "x_mm"] == 2.0


def test_auto_index_is_exact_when_small_and_hnsw_when_large(monkeypatch):
    x, _ = clustered(50)
    assert build_index(x, "cosine", "auto")[1] == "flat"
    monkeypatch.setattr(index_module, "EXACT_BELOW", 40)
    assert build_index(x, "cosine", "auto")[1] == "hnsw"


def test_a_tampered_or_foreign_index_is_refused(tmp_path):
    store, x = filled_store(tmp_path)
    store.merge()
    index_store(store, tmp_path / "index")
    with pytest.raises(CTFMError, match="the index holds 16-dim embeddings, the query is 8-dim"):
        RetrievalIndex(tmp_path / "index").search(np.ones((1, 8), np.float32))
    with open(tmp_path / "index" / "index.faiss", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CTFMError, match="index.faiss: missing or not the file index.json describes"):
        RetrievalIndex(tmp_path / "index")
    with pytest.raises(CTFMError, match="no index here"):
        RetrievalIndex(tmp_path / "nothing")


def test_index_of_an_unmerged_store_is_one_line(tmp_path):
    with pytest.raises(CTFMError, match="no merged store; run extract.json"):
        index_store(EmbeddingStore(tmp_path, {"w": 1}), tmp_path / "index")


# --- regions ---------------------------------------------------------------------------------------------------


def test_region_centre_from_a_box_and_from_a_mask(tmp_path):
    import nibabel as nib

    np.testing.assert_allclose(region_centre_mm("ct.nii.gz", box_mm=[0, 0, 0, 10, 20, 30]), [5, 10, 15])
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:4, 6:8, 0:2] = 5
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(region_centre_mm("ct.nii.gz", mask=tmp_path / "mask.nii.gz", label=5), [5.0, 13.0, 1.0], atol=1e-4)
    with pytest.raises(CTFMError, match="no voxel has label 7"):
        region_centre_mm("ct.nii.gz", mask=tmp_path / "mask.nii.gz", label=7)
    with pytest.raises(CTFMError, match="exactly one of query_box_mm and query_mask"):
        region_centre_mm("ct.nii.gz")
    with pytest.raises(CTFMError, match=r"give \[x0, y0, z0, x1, y1, z1\]"):
        region_centre_mm("ct.nii.gz", box_mm=[1, 2, 3])


def test_crop_at_stays_inside_and_pads_small_volumes():
    volume = torch.arange(40 * 40 * 40, dtype=torch.float32).reshape(1, 40, 40, 40)
    crop = crop_at(volume, (39, 0, 20), (16, 16, 16))
    assert crop.shape == (1, 1, 16, 16, 16)
    assert crop[0, 0, 0, 0, 0] == volume[0, 24, 0, 12]  # shifted inside on both ends
    assert crop_at(volume[:, :10], (5, 5, 5), (24, 16, 16)).shape == (1, 1, 32, 16, 16)  # 24 -> 32, padded
    np.testing.assert_allclose(world_to_voxel([6.0, 4.0, 2.0], np.diag([3.0, 2.0, 1.0, 1.0])), [2, 2, 2])


# --- probing protocols on known answers ------------------------------------------------------------------------


def region_mean_encoder(region):
    """An "encoder" whose embedding is (1, mean intensity inside ``region``): only that region matters."""
    return lambda x: torch.stack([torch.ones(len(x)), x[(slice(None), 0, *region)].flatten(1).mean(1)], dim=1)


def test_occlusion_saliency_peaks_where_the_embedding_looks():
    patch = torch.rand(1, 1, 16, 32, 32) + 1.0
    region = (slice(8, 16), slice(0, 16), slice(16, 32))
    saliency = occlusion_saliency(region_mean_encoder(region), patch, mask_size=(8, 16, 16), n_batch=4)
    assert saliency.shape == (16, 32, 32)
    inside, outside = saliency[region], saliency[:8]
    assert float(inside.min()) > 0 and float(outside.max()) == pytest.approx(0.0, abs=1e-6)


def test_semantic_search_finds_the_structure_in_a_shifted_copy():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((1, 32, 64, 64)).astype(np.float32))
    label = torch.zeros(1, 32, 64, 64)
    label[:, 8:24, 32:64, 32:64] = 7
    query = torch.roll(target, shifts=(0, -32, -32), dims=(1, 2, 3))  # the structure moved to the corner
    query_label = torch.roll(label, shifts=(0, -32, -32), dims=(1, 2, 3))
    embed = lambda x: x.flatten(1)[:, ::7]  # a patch's own voxels: identical patches match exactly
    result = search_structure(embed, query, query_label, target, label, 7, (16, 32, 32), (3.0, 1.0, 1.0), overlap=0.5)
    assert result["hit"] and result["cosine"] == pytest.approx(1.0)
    assert result["distance_mm"] < 3.0 * 8 + 1


def test_perturbations_keep_the_shape_and_change_the_volume():
    volume = torch.zeros(1, 16, 32, 32)
    volume[:, 4:12, 8:24, 8:24] = 0.5
    for kind in PERTURBATIONS:
        out = perturb(volume, kind, (3.0, 1.0, 1.0))
        assert out.shape == volume.shape and not torch.equal(out, volume), kind
    shifted = perturb(volume, "shifted", (3.0, 1.0, 1.0))
    assert torch.equal(shifted[:, 6:14, 14:30, 14:30], volume[:, 4:12, 8:24, 8:24])  # 2, 6, 6 voxels = 6 mm
    cosines, base = retest_cosines(lambda v: torch.tensor([1.0, float(v.mean())]), volume, (3.0, 1.0, 1.0))
    assert base.tolist() == [1.0, float(volume.mean())]
    assert set(cosines) == set(PERTURBATIONS) and all(0.99 < c <= 1.0 + 1e-6 for c in cosines.values())
    with pytest.raises(ValueError, match="perturbation 'flipped'"):
        perturb(volume, "flipped", (1, 1, 1))


def test_organ_crops_and_cluster_scores():
    image = torch.rand(1, 32, 64, 64)
    label = torch.zeros(1, 32, 64, 64, dtype=torch.int64)
    label[:, :16, :32] = 1
    label[:, 16:, 32:] = 2
    label[:, 0, 0, 0] = 3  # too small to crop
    crops = organ_crops(image, label, {1: "liver", 2: "spleen", 3: "tiny"}, None, (16, 16, 16), 4, 10, seed=0)
    assert [organ for _, organ in crops] == ["liver"] * 4 + ["spleen"] * 4
    assert all(c.shape == (1, 1, 16, 16, 16) for c, _ in crops)
    x, y = clustered(40, k=4)
    scores = cluster_scores(x, [f"organ{v}" for v in y], [f"scan{i // 20}" for i in range(40)])
    assert scores["nmi"] == pytest.approx(1.0) and scores["knn_accuracy"] == 1.0 and scores["silhouette"] > 0.5
    noise = np.random.default_rng(1).standard_normal((40, 16))
    assert cluster_scores(noise, [f"organ{v}" for v in y], [f"scan{i // 20}" for i in range(40)])["nmi"] < 0.5


def test_extractor_rows_place_patches_where_the_encoder_saw_them():
    from ctfm.embedding import PatchEmbeddingInferer
    from ctfm.networks import CTFMEmbeddingEncoder
    from ctfm.retrieval.extract import Extractor

    affine = torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0]))
    image = MetaTensor(torch.rand(1, 1, 40, 130, 130), affine=affine)
    extractor = Extractor([], None, CTFMEmbeddingEncoder(init_filters=4).eval(), PatchEmbeddingInferer((24, 128, 128)), None)
    row = extractor.row(image)
    centres = row["patch_centres_mm"].numpy()
    # 24 slices run as 32 (the encoder's multiple of 16): the first patch's centre is voxel 15.5 along S
    np.testing.assert_allclose(centres[0], [15.5 * 3.0, 63.5, 63.5])
    assert row["patch_embeddings"].shape == (len(centres), 64) and row["info"]["shape"] == [40, 130, 130]
    np.testing.assert_array_equal(row["embedding"].numpy(), row["patch_embeddings"].min(0).values.numpy())


def test_ids_that_look_like_numbers_stay_text(tmp_path):
    store = EmbeddingStore(tmp_path / "store", {"weights": "w"})
    x, _ = clustered(3)
    for i in range(3):
        store.put(f"00{i}", torch.from_numpy(x[i]), f"/data/00{i}.nii.gz")
    store.merge()
    index_store(store, tmp_path / "index")
    hits = RetrievalIndex(tmp_path / "index").search(x[1][None], k=2, exclude=["001"])[0]
    assert "001" not in hits["id"].tolist() and all(i.startswith("00") for i in hits["id"])


def test_a_store_mixing_recipes_is_not_merged(tmp_path):
    store = EmbeddingStore(tmp_path, {"weights": "w"})
    store.put("a", torch.ones(4), "a.nii.gz", {"patch_embeddings": torch.ones(2, 4), "patch_centres_mm": torch.zeros(2, 3)})
    store.put("b", torch.ones(4), "b.nii.gz")
    with pytest.raises(CTFMError, match="1 of 2 rows hold patch embeddings"):
        store.merge()
