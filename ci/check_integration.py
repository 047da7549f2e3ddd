"""Serve a bundle from MONAI Label and from a MONAI Deploy application; check each labels a CT as ``monai.bundle run`` does.

``label``: a MONAI Label 0.8.5 server (its ``monaibundle`` sample app, the bundle under ``<app>/model/``, started
offline) receives ``POST /infer/<bundle>?image=<id>&output=image`` for the sample CT ``example_ct.nii.gz``.

``deploy``: a MONAI Deploy App SDK 4.0.0 application on the SDK's DICOM path, as a hospital deploys it: DICOM
study folder -> series selector -> series to volume -> ``MonaiBundleInferenceOperator`` on the bundle folder ->
the label volume, written as NIfTI; input: the sample series ``example_ct_dicom``.

The bundle comes from a registry, as a hospital gets it: ``--registry URL_OR_DIR`` (or ``$CTFM_REGISTRY``), else
the repository published into a temporary registry folder (``python -m ctfm.registry publish``); it is downloaded
with ``python -m ctfm.registry download`` (hash and archive checks) into the check's work folder. ``--bundle DIR``
checks a bundle folder as it is instead.

Either tool reads ``inference.json``'s ``network_def``, ``preprocessing``, ``inferer``, ``postprocessing`` and
``device``, ``models/model.pt`` and ``metadata.json``. The same CT then goes through ``python -m monai.bundle run
--config_file <bundle>/configs/inference.json`` and the two label maps are compared voxel by voxel in one
orientation (RAS). Exit status 0 when they agree on at least ``--min_agreement`` and the map is not empty.

Neither tool can share the zoo's virtual environment, nor each other's (MONAI Label needs pydicom<3, the SDK
pydicom>=3; see ``../shared/reference/integration.md``), so each check makes its own, with torch pinned by
``constraints.txt`` (network: PyPI; 2-4 minutes the first time), and re-runs this script inside it::

    python ci/check_integration.py label
    python ci/check_integration.py deploy --venv /tmp/deployvenv --input DICOM_STUDY_FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The bundle both tools serve.
BUNDLE = "ctfm_segmentation"
#: What each tool's venv gets besides this repository.
TOOL_PACKAGES = {
    "deploy": ["monai-deploy-app-sdk==4.0.0"],
    "label": ["monailabel==0.8.5", "pydicom<3", "pynetdicom<3", "dicomweb-client[gcp]>=0.59.1,<0.60", "numpy<2"],
}
#: The zoo's dependencies that MONAI Label's pins exclude; ``ctfm`` imports them only for DICOM SEG output.
LABEL_EXCLUDES = {"pydicom", "highdicom", "pylibjpeg-openjpeg"}
#: DICOMSeriesSelectorOperator rules: every CT series.
CT_SERIES_RULES = json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]})


def make_venv(tool: str, venv: Path) -> Path:
    """A virtual environment at ``venv`` with this repository and ``tool``'s packages; returns its python."""
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PIP_CONSTRAINT=str(REPO / "constraints.txt"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [str(python), "-m", "pip", "install", "-q"]
    if tool == "label":  # the zoo's dependencies minus those MONAI Label pins otherwise
        dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        kept = [d for d in dependencies if not any(d.startswith(name) for name in LABEL_EXCLUDES)]
        subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True, env=env)
        subprocess.run([*pip, *kept, *TOOL_PACKAGES[tool]], check=True, env=env)
    else:
        subprocess.run([*pip, "-e", str(REPO), *TOOL_PACKAGES[tool]], check=True, env=env)
    (venv / ".installed").touch()
    return python


# ---- MONAI Label ----


def serve_monai_label(argv: list[str]) -> None:
    """``monailabel start_server ARGV`` in this process.

    PyPI's torchvision is a CUDA build whose operator library cannot load beside CPU torch; torchvision then
    fails at import on its fake-kernel registration for ``torchvision::nms`` and ``qnms``, and MONAI Label imports
    ``torchvision.utils``. Defining the two operator schemas first lets the import finish (nothing here calls them).
    """
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    from monailabel.main import Main

    sys.argv = ["monailabel", "start_server", *argv]
    Main().run()


def run_monai_label(bundle: Path, ct: Path, output: Path, work: Path, port: int) -> None:
    """Start MONAI Label with ``bundle`` as its one model, ask it to segment ``ct``, write ``output``, stop it."""
    from monailabel import __file__ as monailabel_init

    sample_app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not sample_app.is_dir():
        raise SystemExit(f"{sample_app}: MONAI Label's monaibundle sample app is missing ({monailabel_init})")
    app, studies = work / "app", work / "studies"
    shutil.copytree(sample_app, app)
    shutil.copytree(bundle, app / "model" / bundle.name, ignore=shutil.ignore_patterns("eval", "runs", "cache"))
    studies.mkdir()
    image_id = "ct"  # MONAI Label's id of a study file is its name without the extension
    shutil.copy(ct, studies / (image_id + (".nii.gz" if ct.name.endswith(".nii.gz") else ct.suffix)))
    server = subprocess.Popen(
        [sys.executable, __file__, "label-server", "--app", str(app), "--studies", str(studies),
         "--conf", "models", bundle.name, "--conf", "zoo_source", "local", "--conf", "sam2", "false",
         "--conf", "skip_trainers", "true", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            if server.poll() is not None:
                raise SystemExit(f"{work / 'server.log'}: MONAI Label exited with status {server.returncode}")
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=5)
                break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit(f"{work / 'server.log'}: MONAI Label did not answer /info/ within 3 minutes")
        request = urllib.request.Request(f"{url}/infer/{bundle.name}?image={image_id}&output=image", method="POST")
        with urllib.request.urlopen(request, timeout=600) as response:
            output.write_bytes(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


# ---- MONAI Deploy ----


def with_identifiers(input_dir: Path, out_dir: Path) -> Path:
    """A copy of the CT series in ``input_dir`` with empty identifiers filled in: the shipped sample series is
    anonymised to empty Study, Series and SOP Instance UIDs, SOP Class UID and Series Number, and the SDK's loader
    skips such files. Files with all of them present are copied unchanged."""
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    out_dir.mkdir()
    study, series = (generate_uid(entropy_srcs=[str(input_dir), role]) for role in ("study", "series"))
    for path in sorted(p for p in input_dir.iterdir() if p.is_file()):
        dataset = pydicom.dcmread(path)
        filled = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPClassUID": CTImageStorage,
                  "SOPInstanceUID": generate_uid(entropy_srcs=[str(path)]), "SeriesNumber": 1}
        missing = {name: value for name, value in filled.items() if dataset.get(name) in ("", None)}
        if not missing:
            shutil.copy(path, out_dir / path.name)
            continue
        for name, value in missing.items():
            setattr(dataset, name, value)
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(out_dir / path.name)
    return out_dir


def run_monai_deploy(bundle: Path, input_dir: Path, output: Path, work: Path) -> None:
    """The Deploy application: the DICOM study under ``input_dir`` -> the bundle -> ``output`` (NIfTI labels)."""
    import nibabel as nib
    import numpy as np
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import AppContext, Application, Fragment, Operator, OperatorSpec
    from monai.deploy.core.domain import Image
    from monai.deploy.core.io_type import IOType
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
    from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator

    study = with_identifiers(input_dir, work / "study")

    class NiftiLabelWriter(Operator):
        """Writes the received label ``Image`` (the SDK's D, H, W order) as NIfTI with its series' affine."""

        def __init__(self, fragment: Fragment, *args, path: Path, **kwargs):
            self.path = path
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec: OperatorSpec):
            spec.input("seg_image")

        def compute(self, op_input, op_output, context):
            image = op_input.receive("seg_image")
            labels = np.swapaxes(image.asnumpy(), 0, 2)  # back to the volume's W, H, D
            affine = np.asarray(image.metadata()["nifti_affine_transform"], dtype=float)
            nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(self.path))

    class BundleApp(Application):
        def compose(self):
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=study, name="loader")
            selector = DICOMSeriesSelectorOperator(self, rules=CT_SERIES_RULES, name="selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="to_volume")
            bundle_op = MonaiBundleInferenceOperator(
                self,
                input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
                output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
                app_context=AppContext({}),
                bundle_path=bundle,
                name="bundle",
            )
            writer = NiftiLabelWriter(self, path=output, name="writer")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, bundle_op, {("image", "image")})
            self.add_flow(bundle_op, writer, {("pred", "seg_image")})

    BundleApp().run()


# ---- comparison ----


def agreement(tool_labels: Path, bundle_labels: Path) -> tuple[float, int, int]:
    """Fraction of voxels with the same label in both maps (compared in RAS), the number of voxels and the number
    of labels other than background in the tool's map."""
    import nibabel as nib
    import numpy as np

    a, b = (nib.as_closest_canonical(nib.load(str(p))) for p in (tool_labels, bundle_labels))
    if a.shape != b.shape or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise SystemExit(f"{tool_labels}: grid {a.shape} differs from {bundle_labels}'s {b.shape} (or affines)")
    x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
    return float((x == y).mean()), x.size, len(np.unique(x[x > 0]))


def check(tool: str, bundle: Path, ct: Path, min_agreement: float, port: int) -> int:
    from ctfm.segmentation.outputs import WriteSegmentationd  # names monai.bundle run's output file

    names = {"label": "MONAI Label", "deploy": "MONAI Deploy"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tool_out = work / f"{tool}_seg.nii.gz"
        if tool == "label":
            run_monai_label(bundle, ct, tool_out, work, port)
        else:
            run_monai_deploy(bundle, ct, tool_out, work)
        if not tool_out.is_file():
            raise SystemExit(f"{tool_out}: {names[tool]} wrote no label map")
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
                   "--bundle_root", str(bundle), "--dataset_dir", str(ct.parent), "--datalist", ct.name,
                   "--output_dir", str(work / "bundle_run"),
                   "--write_preview", "False"]
        subprocess.run(command, check=True)
        bundle_out = WriteSegmentationd(output_dir=work / "bundle_run", data_root_dir=ct.parent).outputs_for(ct)["nifti"]
        fraction, voxels, structures = agreement(tool_out, bundle_out)
    verdict = "PASS" if fraction >= min_agreement and structures > 0 else "FAIL"
    print(f"{verdict}: {names[tool]} and monai.bundle run give the same label for {100 * fraction:.4f}% of {voxels} "
          f"voxels, {structures} structures found ({bundle.name}, {ct}; needed {100 * min_agreement:.1f}%)")
    return 0 if verdict == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["label-server"]:
        serve_monai_label(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(TOOL_PACKAGES))
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: downloaded from the registry)")
    parser.add_argument("--registry", default=None, help="registry URL or folder to download ctfm_segmentation from "
                        "(default: $CTFM_REGISTRY, else the repository published into a temporary registry)")
    parser.add_argument("--input", type=Path, default=None,
                        help="CT file (label) or DICOM study folder (deploy); default: the shipped sample")
    parser.add_argument("--venv", type=Path, default=None, help="default: REPO/.venv-<tool>")
    parser.add_argument("--min_agreement", type=float, default=0.999)
    parser.add_argument("--port", type=int, default=8765, help="MONAI Label's port on 127.0.0.1")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:
        python = make_venv(args.tool, args.venv or REPO / f".venv-{args.tool}")
        with tempfile.TemporaryDirectory() as tmp:
            if args.bundle is None and not (args.registry or os.environ.get("CTFM_REGISTRY")):
                registry = Path(tmp) / "registry"  # published here, where the wheel can be built
                published = subprocess.run([sys.executable, "-m", "ctfm.registry", "publish", "--out", str(registry),
                                            str(REPO / "bundles" / BUNDLE)])
                if published.returncode != 0:
                    raise SystemExit(f"{REPO / 'bundles' / BUNDLE}: not published (see the error above)")
                argv += ["--registry", str(registry)]
            return subprocess.run([str(python), __file__, "--inside", *argv]).returncode
    if args.input is None:
        from ctfm.sample_data import sample_path

        args.input = sample_path("example_ct.nii.gz" if args.tool == "label" else "example_ct_dicom")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle.resolve() if args.bundle else from_registry(args.registry, Path(tmp))
        return check(args.tool, bundle, args.input.resolve(), args.min_agreement, args.port)


def from_registry(registry: str | None, work: Path) -> Path:
    """``ctfm_segmentation`` downloaded (verified) from ``registry`` (default ``$CTFM_REGISTRY``) into ``work``."""
    from ctfm.registry.client import download
    from ctfm.registry.index import registry_of

    done = download(BUNDLE, registry_of(registry), work / "bundles")
    print(f"{BUNDLE} {done.version} downloaded from {registry_of(registry)} into {done.path}")
    return done.path


if __name__ == "__main__":
    sys.exit(main())
