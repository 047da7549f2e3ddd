"""ctfm.lesions: synthetic haemorrhage lands where each kind belongs, at the drawn HU, seeded, input untouched.

Fast tests run on ``ctfm.phantom.head_phantom``; the slow test runs on the real InVesalius CT (fetched into the
cache, skipped where apt-get cannot fetch it).
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from ctfm.errors import CTFMError
from ctfm.lesions import (
    LESION_KINDS,
    LESION_RANGES,
    SDH_EXTENT_MM,
    LesionSpec,
    estimate_noise_std,
    head_masks,
    insert_lesion,
    lesion_case,
    random_lesion,
)
from ctfm.phantom import HEAD_LABELS, head_phantom


@pytest.fixture(scope="module")
def phantom():
    return head_phantom(seed=3)


@pytest.fixture(scope="module")
def masks(phantom):
    return head_masks(phantom.image, phantom.affine, labels=phantom.labels)


def spacing(affine):
    return np.sqrt((affine[:3, :3] ** 2).sum(0))


def world(affine, mask):
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_label_masks_are_the_phantom_labels(phantom, masks):
    labels = phantom.labels
    np.testing.assert_array_equal(masks["skull"], labels == HEAD_LABELS["skull"])
    np.testing.assert_array_equal(masks["brain"], labels == HEAD_LABELS["brain"])
    np.testing.assert_array_equal(masks["ventricles"], labels == HEAD_LABELS["ventricles"])
    np.testing.assert_array_equal(masks["cavity"], np.isin(labels, [2, 3]))


@pytest.mark.parametrize("seed", [0, 3])
def test_hu_masks_agree_with_the_phantom_labels(seed):
    ph = head_phantom(seed=seed)
    hu = head_masks(ph.image, ph.affine)
    labels = head_masks(ph.image, ph.affine, labels=ph.labels)
    assert dice(hu["skull"], labels["skull"]) > 0.99
    assert dice(hu["cavity"], labels["cavity"]) > 0.97
    assert dice(hu["brain"], labels["brain"]) > 0.97
    ventricles = hu["ventricles"]
    assert (ventricles & labels["ventricles"]).sum() >= 0.3 * labels["ventricles"].sum()
    assert (ventricles & labels["ventricles"]).sum() >= 0.9 * ventricles.sum()
    assert not (hu["brain"] & hu["csf"]).any() and not (hu["cavity"] & hu["skull"]).any()


def test_head_masks_refuse_what_is_not_a_head():
    ph = head_phantom(seed=0)
    with pytest.raises(CTFMError, match="no bone"):
        head_masks(np.full((20, 20, 20), 30.0, np.float32), ph.affine)
    shell = ph.image.copy()
    shell[:, :, : shell.shape[2] // 2] = -1000.0  # half a skull: nothing enclosed
    shell[:, :, shell.shape[2] // 2 :][ph.labels[:, :, shell.shape[2] // 2 :] != HEAD_LABELS["skull"]] = -1000.0
    with pytest.raises(CTFMError, match="no intracranial cavity"):
        head_masks(shell, ph.affine)
    with pytest.raises(CTFMError, match="3-D"):
        head_masks(np.zeros((4, 4)), ph.affine)


def test_noise_estimate_is_the_phantom_noise():
    for noise in (8.0, 20.0):
        ph = head_phantom(seed=1, noise_hu=noise)
        brain = ph.labels == HEAD_LABELS["brain"]
        assert estimate_noise_std(ph.image, brain) == pytest.approx(noise, rel=0.12)


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_random_lesion_draws_from_the_stated_ranges(kind):
    rng = np.random.default_rng(0)
    specs = [random_lesion(kind, rng) for _ in range(200)]
    for name, field in (("hu", "hu"), ("size_mm", "size_mm")):
        lo, hi = LESION_RANGES[kind][name]
        values = np.array([getattr(spec, field) for spec in specs])
        assert values.min() >= lo and values.max() <= hi and values.max() - values.min() > 0.8 * (hi - lo)
    assert all(spec.kind == kind and spec.centre_mm is None for spec in specs)
    narrow = random_lesion(kind, rng, {kind: {"hu": (70.0, 70.0)}})
    assert (
        narrow.hu == 70.0 and LESION_RANGES[kind]["size_mm"][0] <= narrow.size_mm <= LESION_RANGES[kind]["size_mm"][1]
    )


def test_blood_ranges_are_acute_blood():
    for kind in LESION_KINDS:
        lo, hi = LESION_RANGES[kind]["hu"]
        assert 50.0 <= lo < hi <= 90.0


def test_lesion_spec_and_random_lesion_refuse_nonsense():
    with pytest.raises(CTFMError, match="not one of"):
        LesionSpec("epidural", 70.0, 10.0)
    with pytest.raises(CTFMError, match="size"):
        LesionSpec("subdural", 70.0, 0.0)
    with pytest.raises(CTFMError, match="centre_mm"):
        LesionSpec("subdural", 70.0, 5.0, (1.0, 2.0))
    with pytest.raises(CTFMError, match="not one of"):
        random_lesion("epidural", np.random.default_rng(0))
    with pytest.raises(CTFMError, match="unknown range names"):
        random_lesion("subdural", np.random.default_rng(0), {"subdural": {"extent": (1.0, 2.0)}})
    with pytest.raises(CTFMError, match="is empty"):
        random_lesion("subdural", np.random.default_rng(0), {"subdural": {"hu": (80.0, 60.0)}})


def place(phantom, masks, kind, seed, **spec_fields):
    rng = np.random.default_rng(seed)
    spec = random_lesion(kind, rng)
    if spec_fields:
        spec = LesionSpec(**{**spec.__dict__, **spec_fields})
    before = phantom.image.copy()
    image, mask = insert_lesion(phantom.image, phantom.affine, spec, rng, masks)
    np.testing.assert_array_equal(phantom.image, before)  # the input is untouched
    assert image.dtype == np.float32 and mask.dtype == bool and mask.shape == image.shape and mask.any()
    return spec, image, mask


def check_values(phantom, masks, spec, image, mask):
    """Lesion voxels at spec.hu plus the image's noise; only the lesion and a thin rim changed; not the skull."""
    values = image[mask]
    noise = estimate_noise_std(phantom.image, masks["brain"])
    assert abs(values.mean() - spec.hu) < 4 * noise / np.sqrt(mask.sum()) + 0.5
    if mask.sum() > 100:
        assert values.std() == pytest.approx(noise, rel=0.25)
    changed = image != phantom.image
    assert not (changed & masks["skull"]).any()
    rim = ndi.binary_dilation(mask, np.ones((3, 3, 3)), iterations=2)
    assert not (changed & ~rim).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intraparenchymal_is_a_blob_inside_the_brain(phantom, masks, seed):
    spec, image, mask = place(phantom, masks, "intraparenchymal", seed)
    assert not (mask & ~masks["brain"]).any()
    assert ndi.label(mask, np.ones((3, 3, 3)))[1] == 1
    volume = mask.sum() * np.prod(spacing(phantom.affine))
    nominal = 4 / 3 * np.pi * (spec.size_mm / 2) ** 3
    assert 0.3 * nominal < volume < 2.5 * nominal
    check_values(phantom, masks, spec, image, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subdural_is_a_crescent_on_the_inner_table(phantom, masks, seed):
    spec, image, mask = place(phantom, masks, "subdural", seed)
    sp = spacing(phantom.affine)
    assert not (mask & ~masks["cavity"]).any()
    to_skull = ndi.distance_transform_edt(~masks["skull"], sampling=sp)
    assert to_skull[mask].max() <= spec.size_mm + sp.max()  # never deeper than its thickness
    touching = mask & ndi.binary_dilation(masks["skull"], np.ones((3, 3, 3)))
    assert touching.sum() >= 0.3 * mask.sum()  # along the inner table
    depth = ndi.distance_transform_edt(np.pad(masks["cavity"], 1), sampling=sp)[1:-1, 1:-1, 1:-1]
    assert not (mask & (depth > spec.size_mm + sp.max())).any()  # outside the brain's core
    x = world(phantom.affine, mask)
    extent = np.ptp(x, axis=0)
    low, high = SDH_EXTENT_MM
    assert extent.max() <= high + 2 * sp.max() and extent.max() >= 0.4 * low
    assert np.all(x[:, 0] > -sp[0]) or np.all(x[:, 0] < sp[0])  # one side of the midline (the falx)
    check_values(phantom, masks, spec, image, mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intraventricular_layers_in_the_dependent_ventricles(phantom, masks, seed):
    spec, image, mask = place(phantom, masks, "intraventricular", seed)
    assert not (mask & ~masks["ventricles"]).any()
    sp = spacing(phantom.affine)
    for side in (1, -1):
        ventricle = masks["ventricles"] & (np.sign(world_x(phantom)) == side)
        blood = mask & ventricle
        assert blood.any()
        y_ventricle, y_blood = world(phantom.affine, ventricle)[:, 1], world(phantom.affine, blood)[:, 1]
        assert y_blood.min() == y_ventricle.min()  # the most posterior (dependent, supine) part
        assert y_blood.max() - y_ventricle.min() <= spec.size_mm + sp[1]  # a flat level size_mm above it
        assert blood.sum() < ventricle.sum()
    check_values(phantom, masks, spec, image, mask)


def world_x(phantom):
    x = np.arange(phantom.image.shape[0]) * phantom.affine[0, 0] + phantom.affine[0, 3]
    return np.broadcast_to(x[:, None, None], phantom.image.shape)


def test_mask_volume_follows_size(phantom, masks):
    def volume(kind, size):
        spec = LesionSpec(kind, 70.0, size)
        return insert_lesion(phantom.image, phantom.affine, spec, np.random.default_rng(0), masks)[1].sum()

    for kind, (small, large) in (
        ("intraparenchymal", (12.0, 36.0)),
        ("subdural", (4.0, 14.0)),
        ("intraventricular", (4.0, 12.0)),
    ):
        assert volume(kind, small) < volume(kind, large)


def test_centre_places_the_lesion(phantom, masks):
    centre = (-25.0, 15.0, 20.0)
    _, _, mask = place(phantom, masks, "intraparenchymal", 0, size_mm=20.0, centre_mm=centre)
    assert np.linalg.norm(world(phantom.affine, mask).mean(0) - centre) < 8.0
    _, _, mask = place(phantom, masks, "subdural", 0, centre_mm=(80.0, 0.0, 30.0))
    assert world(phantom.affine, mask)[:, 0].min() > 0  # on the patient's right convexity
    _, _, mask = place(phantom, masks, "intraventricular", 0, centre_mm=(-10.0, 0.0, 10.0))
    assert world(phantom.affine, mask)[:, 0].max() < 0  # only the left ventricle


def test_same_seed_same_lesion(phantom, masks):
    for kind in LESION_KINDS:
        _, first, first_mask = place(phantom, masks, kind, 7)
        _, again, again_mask = place(phantom, masks, kind, 7)
        _, other, _ = place(phantom, masks, kind, 8)
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(first_mask, again_mask)
        assert not np.array_equal(first, other)


def test_unplaceable_lesions_raise_one_line(phantom, masks):
    rng = np.random.default_rng(0)
    no_ventricles = {**masks, "ventricles": np.zeros_like(masks["ventricles"])}
    with pytest.raises(CTFMError, match="no ventricles") as info:
        insert_lesion(phantom.image, phantom.affine, LesionSpec("intraventricular", 60.0, 5.0), rng, no_ventricles)
    assert "\n" not in str(info.value)
    with pytest.raises(CTFMError, match="outside the image"):
        insert_lesion(
            phantom.image, phantom.affine, LesionSpec("intraparenchymal", 70.0, 10.0, (900.0, 0.0, 0.0)), rng, masks
        )
    with pytest.raises(CTFMError, match="no voxel of it fits"):  # in the scalp, outside the brain
        insert_lesion(
            phantom.image, phantom.affine, LesionSpec("intraparenchymal", 70.0, 6.0, (0.0, 0.0, 95.0)), rng, masks
        )
    with pytest.raises(CTFMError, match="lack"):
        insert_lesion(phantom.image, phantom.affine, LesionSpec("subdural", 70.0, 6.0), rng, {"skull": masks["skull"]})


def test_lesion_case_labels_and_findings(phantom, masks):
    image, labels, findings = lesion_case(phantom.image, phantom.affine, LESION_KINDS, seed=4, masks=masks)
    assert findings == {"haemorrhage": 1.0, "intraparenchymal": 1.0, "subdural": 1.0, "intraventricular": 1.0}
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2, 3}
    assert not ((labels == 1) & ~masks["brain"]).any()
    assert not ((labels == 2) & ~masks["cavity"]).any()
    assert not ((labels == 3) & ~masks["ventricles"]).any()
    for label in (1, 2, 3):
        lo, hi = LESION_RANGES[LESION_KINDS[label - 1]]["hu"]
        assert lo - 10 < image[labels == label].mean() < hi + 10
    again = lesion_case(phantom.image, phantom.affine, LESION_KINDS, seed=4, masks=masks)
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[1], labels)

    image, labels, findings = lesion_case(phantom.image, phantom.affine, ("subdural",), seed=4, masks=masks)
    assert findings == {"haemorrhage": 1.0, "intraparenchymal": 0.0, "subdural": 1.0, "intraventricular": 0.0}
    assert set(np.unique(labels)) == {0, 2}

    image, labels, findings = lesion_case(phantom.image, phantom.affine, (), seed=4)
    assert findings == dict.fromkeys(("haemorrhage", *LESION_KINDS), 0.0)
    assert not labels.any()
    np.testing.assert_array_equal(image, phantom.image)
    with pytest.raises(CTFMError, match="not among"):
        lesion_case(phantom.image, phantom.affine, ("epidural",), seed=0)


def test_lesion_case_from_hu_alone():
    ph = head_phantom(seed=5)
    _, labels, findings = lesion_case(ph.image, ph.affine, ("intraparenchymal", "intraventricular"), seed=1)
    assert findings["haemorrhage"] == 1.0 and findings["subdural"] == 0.0
    assert ((labels == 1) & (ph.labels == HEAD_LABELS["brain"])).sum() >= 0.95 * (labels == 1).sum()
    assert ((labels == 3) & (ph.labels == HEAD_LABELS["ventricles"])).sum() >= 0.9 * (labels == 3).sum()


# --- the real CT -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lesions_in_the_real_cranium_ct():
    from ctfm.invesalius import fetch_cranium, read_inv3

    try:
        path = fetch_cranium()
    except CTFMError as e:
        if "sha256" in str(e):
            raise
        pytest.skip(f"the InVesalius CT cannot be fetched here: {e}")
    image, affine = read_inv3(path)
    masks = head_masks(image, affine)
    ml = np.prod(spacing(affine)) / 1000.0
    # measured on this CT: cavity 1.49 l, parenchyma 1.24 l, ventricles 48 ml, skull 0.55 l
    assert 1.3 < masks["cavity"].sum() * ml / 1000 < 1.7
    assert 1.0 < masks["brain"].sum() * ml / 1000 < 1.45
    assert 25 < masks["ventricles"].sum() * ml < 80
    assert 0.4 < masks["skull"].sum() * ml / 1000 < 0.7
    ventricles = world(affine, masks["ventricles"]).mean(0)
    cavity = world(affine, masks["cavity"]).mean(0)
    assert np.linalg.norm(ventricles - cavity) < 15.0  # central (measured: 5 mm apart)
    assert 3.0 < estimate_noise_std(image, masks["brain"]) < 12.0

    out, labels, findings = lesion_case(image, affine, LESION_KINDS, seed=0, masks=masks)
    assert findings["haemorrhage"] == 1.0 and all(findings[kind] == 1.0 for kind in LESION_KINDS)
    assert not ((labels == 1) & ~masks["brain"]).any()
    assert not ((labels == 3) & ~masks["ventricles"]).any()
    sdh = labels == 2
    to_skull = ndi.distance_transform_edt(~masks["skull"], sampling=spacing(affine))
    assert np.percentile(to_skull[sdh], 99) <= LESION_RANGES["subdural"]["size_mm"][1] + 2.0
    for label in (1, 2, 3):
        assert 45.0 < out[labels == label].mean() < 90.0
