"""Each bundle, downloaded from a registry into a fresh venv made from its metadata alone, runs as in the repository.

    python ci/check_fresh_venv.py [NAME ...] [--out ci/results/fresh_venv.md] [--keep DIR]

Run once per release (it needs PyPI and takes minutes per bundle); its result is committed as
``ci/results/fresh_venv.md``. For every bundle (default: all):

1. the repository is published into a temporary registry (``python -m ctfm.registry publish``) served on 127.0.0.1;
2. a new venv gets exactly what the model zoo's ``get_bundle_requirements.py`` installs from ``metadata.json``:
   ``monai==``, ``torch==`` (the CPU wheel, pinned by ``constraints.txt``), ``numpy==`` and every
   ``required_packages_version`` pin but ``ctfm``, from PyPI with their dependencies; then ``ctfm`` from the
   registry's PEP 503 index alone (``--index-url URL/simple``) with ``--no-deps``, so that a package the metadata
   forgot is missing here as on a user's machine;
3. that venv's ``python -m ctfm.registry download NAME --registry URL --bundle_dir DIR`` fetches the bundle;
4. from an unrelated working directory, ``python -m monai.bundle run --config_file DIR/NAME/configs/<config>
   --bundle_root DIR/NAME`` runs it on the sample CT; the repository's venv runs the in-repo bundle the same way;
5. the two output folders must hold the same files with the same content: label maps and tensors compared value
   for value, text byte for byte once the output folder's and the installed sample data's paths are masked (PNG
   previews are not compared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
from http_server import serve  # noqa: E402

#: The command each bundle runs: config file and overrides (small inputs of the shipped sample data).
RUNS = {
    "ctfm_pretrain": ("inference.json", {"datalist": "example_ct_sm.nii.gz"}),
    "ctfm_segmentation": ("inference.json", {"datalist": "example_ct_sm.nii.gz", "write_preview": "False"}),
    "ctfm_triage": ("inference.json", {"datalist": "imagesTs/head_test_000.nii.gz"}),
    "ctfm_retrieval": ("extract.json", {"datalist": "example_ct_sm.nii.gz", "overlap": "0.0"}),
}
#: Where each run writes (the retrieval bundle's store, the others' output_dir).
OUTPUT_ID = {"ctfm_retrieval": "store_dir"}


def requirements(meta: dict) -> list[str]:
    """What the model zoo's ``get_bundle_requirements.py`` installs, ``ctfm`` left out (it comes from the registry)."""
    pins = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    pins += [f"{name}=={version}" for name, version in meta["required_packages_version"].items() if name != "ctfm"]
    return pins


def make_venv(venv: Path, meta: dict, simple_url: str) -> tuple[Path, float, list[str]]:
    """A venv with the bundle's requirements; returns its python, the install time (s) and ``pip freeze``."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "constraints.txt"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *requirements(meta)], check=True, env=env)
    ctfm = f"ctfm=={meta['required_packages_version']['ctfm']}"
    subprocess.run([*pip, "--no-deps", "--index-url", simple_url, ctfm], check=True, env=env)
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True).stdout
    return python, time.monotonic() - start, freeze.split()


def run_bundle(python: Path, bundle: Path, out: Path, cwd: Path) -> float:
    config, overrides = RUNS[bundle.name]
    overrides = {**overrides, OUTPUT_ID.get(bundle.name, "output_dir"): str(out)}
    cmd = [str(python), "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / config),
           "--bundle_root", str(bundle), *[f"--{k}={v}" for k, v in overrides.items()]]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{bundle}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two output folders (empty: the same outputs)."""
    import nibabel as nib
    import numpy as np
    from safetensors.numpy import load_file

    def files(folder):
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".png"}

    left, right = files(a), files(b)
    problems = [f"only in one run: {sorted(left ^ right)}"] if left != right else []
    for rel in sorted(left & right):
        x, y = a / rel, b / rel
        if rel.endswith((".nii.gz", ".nii")):
            same = np.array_equal(np.asarray(nib.load(str(x)).dataobj), np.asarray(nib.load(str(y)).dataobj))
        elif rel.endswith(".safetensors"):
            p, q = load_file(str(x)), load_file(str(y))
            same = p.keys() == q.keys() and all(np.array_equal(p[k], q[k]) for k in p)
        elif rel.endswith((".csv", ".json", ".txt")):  # paths of the output folder and the installed sample data aside
            same = _paths_out(x.read_text(), a) == _paths_out(y.read_text(), b)
        else:
            same = x.read_bytes() == y.read_bytes()
        if not same:
            problems.append(f"{rel} differs")
    return problems


def _paths_out(text: str, out: Path) -> str:
    return re.sub(r"[^\s,\"']*/ctfm/sample_data/", "<sample_data>/", text.replace(str(out), "<out>"))


def check(names: list[str], work: Path) -> list[dict]:
    registry = work / "registry"
    subprocess.run([sys.executable, "-m", "ctfm.registry", "publish", "--out", str(registry), "--no_check"], check=True,
                   stdout=subprocess.DEVNULL)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    rows = []
    with serve(registry) as url:
        for name in names:
            meta = json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
            python, install_s, freeze = make_venv(work / f"venv_{name}", meta, url + "simple/")
            bundles = work / f"bundles_{name}"
            subprocess.run([str(python), "-m", "ctfm.registry", "download", name, "--registry", url,
                            "--bundle_dir", str(bundles)], check=True, cwd=elsewhere, stdout=subprocess.DEVNULL)
            downloaded_s = run_bundle(python, bundles / name, work / f"out_downloaded_{name}", elsewhere)
            repo_s = run_bundle(Path(sys.executable), ROOT / "bundles" / name, work / f"out_repo_{name}", ROOT)
            problems = compare(work / f"out_downloaded_{name}", work / f"out_repo_{name}")
            n_files = len([p for p in (work / f"out_repo_{name}").rglob("*") if p.is_file()])
            rows.append({"bundle": name, "version": meta["version"], "requirements": requirements(meta),
                         "packages_in_venv": len(freeze), "install_s": round(install_s, 1), "run_s": round(downloaded_s, 1),
                         "repo_run_s": round(repo_s, 1), "outputs": n_files, "same": not problems, "problems": problems})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_report(rows: list[dict], path: Path) -> None:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Fresh-venv check: each bundle from the registry, in a venv made from its metadata alone", "",
             f"`python ci/check_fresh_venv.py` at commit {commit or '?'} on {time.strftime('%Y-%m-%d')}, {platform.platform()}, "
             f"Python {platform.python_version()}; packages from PyPI, `ctfm` from the registry's simple index "
             "(`--no-deps`), torch pinned by constraints.txt.", "",
             "| bundle | version | pins from metadata | packages in the venv | install (s) | downloaded run (s) | in-repo run (s) | output files | same outputs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['version']} | {len(r['requirements'])} + ctfm | {r['packages_in_venv']} | "
                     f"{r['install_s']} | {r['run_s']} | {r['repo_run_s']} | {r['outputs']} | "
                     f"{'yes' if r['same'] else 'NO: ' + '; '.join(r['problems'])} |")
    lines += ["", "Installed per bundle (besides `ctfm`):", ""]
    lines += [f"- {r['bundle']}: `{' '.join(r['requirements'])}`" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "ci" / "results" / "fresh_venv.md")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = check(args.names, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = check(args.names, Path(tmp))
    write_report(rows, args.out)
    print(f"wrote {args.out}")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
