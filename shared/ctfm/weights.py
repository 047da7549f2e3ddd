"""The table of known weights, and the one way every bundle gets weights into a network.

:data:`WEIGHTS` lists every published CT-FM weight and every demo weight a bundle of this repository ships, each
as data: the network and its arguments, the files and their sha256, where they come from, their licence and the
preprocessing they expect (timm's pretrained-config idea). A config names weights by table name or by path:

- ``"$ctfm.weights.load(@network_def, @ckpt_path)"`` -- the whole network, every key required;
- ``"$ctfm.weights.init_encoder(@network_def, @encoder_weights)"`` -- only ``network.encoder`` (fine-tuning).

A name resolves to the bundle that ships it when the running bundle is that one, else to the weights cache
(``$CTFM_WEIGHTS_DIR``, default ``~/.cache/ctfm/weights/<name>/``), which ``python -m ctfm.weights fetch NAME``
fills from the table's URL (or ``--source``, e.g. a copy of the bundle), checking every file's sha256, else to
the bundle as ``monai.bundle download`` placed it. A bundle never reads another bundle's folder by itself. A path that is a shipped file of a bundle in the
table (``<bundle>/models/model.pt``) is checked against its recorded sha256 before it is read, so a damaged copy
is refused; tensors holding NaN or Inf are refused always (:mod:`ctfm.checkpoint`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ctfm.checkpoint import CheckpointError, load_weights
from ctfm.download import copy_to, join
from ctfm.errors import CTFMError, install_excepthook
from ctfm.files import atomic_path, sha256sum

__all__ = [
    "CTFM_PREPROCESSING",
    "WEIGHTS",
    "KnownWeights",
    "cache_dir",
    "check_files",
    "fetch",
    "init_encoder",
    "load",
    "resolve",
]

logger = logging.getLogger("ctfm.weights")

#: What every CT-FM weight expects (``../shared/reference/ctfm.md`` section 2): see :mod:`ctfm.transforms`.
CTFM_PREPROCESSING = {
    "orientation": "SPL",
    "spacing_mm": [3.0, 1.0, 1.0],
    "crop_foreground": "HU > 0",
    "pad_hu": -1024,
    "hu_range": [-1024, 2048],
    "scaled_to": [0, 1],
}
_ENCODER_ARGS = {"init_filters": 32, "in_channels": 1, "spatial_dims": 3, "blocks_down": [1, 2, 2, 4, 4]}
_HF = "https://huggingface.co/project-lighter/{}/resolve/main/"
_HF_FILES = {"config.json": None, "model.safetensors": None}


@dataclass(frozen=True)
class KnownWeights:
    """One row of the weights table.

    Attributes:
        name: the table key, used in configs and on the command line.
        network: ``"encoder"`` (:class:`~ctfm.networks.CTFMEncoder`), ``"segresnet"``
            (:class:`~ctfm.networks.CTFMSegResNetDS`) or ``"classifier"`` (:class:`~ctfm.networks.CTFMClassifier`).
        arguments: the network's constructor arguments.
        files: each file, relative to the weights' folder, with its sha256 (``None`` where no copy could be
            checked yet: the first :func:`fetch` prints it, to be recorded here).
        load_path: what to load, relative to the weights' folder (``"."`` for a Hugging Face folder).
        url: base URL the files are fetched from (each file name is appended), or ``None``.
        licence: licence of the weights.
        preprocessing: what the input must look like.
        description: one line.
        bundle: for weights shipped in a bundle of this repository: its folder name; ``files`` are then
            relative to the bundle folder.
    """

    name: str
    network: str
    arguments: Mapping
    files: Mapping[str, str | None]
    load_path: str
    url: str | None
    licence: str
    preprocessing: Mapping = field(default_factory=lambda: dict(CTFM_PREPROCESSING))
    description: str = ""
    bundle: str | None = None


WEIGHTS: dict[str, KnownWeights] = {
    w.name: w
    for w in [
        KnownWeights(
            name="ct_fm_feature_extractor",
            network="encoder",
            arguments=_ENCODER_ARGS,
            files=_HF_FILES,
            load_path=".",
            url=_HF.format("ct_fm_feature_extractor"),
            licence="Apache-2.0",
            description="CT-FM's pre-trained encoder (148k IDC CTs, intra-sample SimCLR); 512-d embedding",
        ),
        KnownWeights(
            name="ct_fm_segresnet",
            network="segresnet",
            arguments={**_ENCODER_ARGS, "out_channels": 2, "dsdepth": 1},
            files=_HF_FILES,
            load_path=".",
            url=_HF.format("ct_fm_segresnet"),
            licence="Apache-2.0",
            description="SegResNetDS on the CT-FM encoder, decoder untrained: a starting point for fine-tuning",
        ),
        KnownWeights(
            name="whole_body_segmentation",
            network="segresnet",
            arguments={**_ENCODER_ARGS, "out_channels": 118, "dsdepth": 4},
            files=_HF_FILES,
            load_path=".",
            url=_HF.format("whole_body_segmentation"),
            licence="Apache-2.0",
            preprocessing={**CTFM_PREPROCESSING, "spacing_mm": [1.5, 1.5, 1.5]},
            description="CT-FM fine-tuned on TotalSegmentator v2 (117 structures + background)",
        ),
        KnownWeights(
            name="ctfm_pretrain_demo",
            network="encoder",
            arguments={**_ENCODER_ARGS, "init_filters": 8},
            files={
                "models/model.pt": "9e890f0c16418f188337ca19af55deb44279353e54f4ddd373b418cac1c52a18",
                "models/encoder_hf/config.json": "7aabacb8b86ab3ba1dd54e47cd2f2a71d2eaca7684151be1e07ca51a8462498f",
                "models/encoder_hf/model.safetensors": "2c917a9f33b39277294c562342c8480dd55c2e5c0e7aaa6c444d145c3c0aad23",
            },
            load_path="models/encoder_hf",
            url=None,
            licence="MIT",
            description="ctfm_pretrain's demo encoder (width 8), pre-trained on the one sample CT: a CPU demo",
            bundle="ctfm_pretrain",
        ),
        KnownWeights(
            name="ctfm_retrieval_demo",
            network="encoder",
            arguments={**_ENCODER_ARGS, "init_filters": 8},
            files={"models/model.pt": "9e890f0c16418f188337ca19af55deb44279353e54f4ddd373b418cac1c52a18"},
            load_path="models/model.pt",
            url=None,
            licence="MIT",
            description="ctfm_retrieval's encoder: the same file as ctfm_pretrain_demo's models/model.pt (frozen; embeds, indexes, probes)",
            bundle="ctfm_retrieval",
        ),
        KnownWeights(
            name="ctfm_segmentation_demo",
            network="segresnet",
            arguments={**_ENCODER_ARGS, "init_filters": 8, "out_channels": 118, "dsdepth": 4},
            files={"models/model.pt": "86b73cf2ae7f859cc76044ff103a0802b817d62f3003e6d54e454425e77ff66b"},
            load_path="models/model.pt",
            url=None,
            licence="MIT",
            preprocessing={**CTFM_PREPROCESSING, "spacing_mm": [3.0, 3.0, 3.0]},
            description="ctfm_segmentation's demo weights (width 8), trained on the one labelled sample CT",
            bundle="ctfm_segmentation",
        ),
        KnownWeights(
            name="ctfm_triage_demo",
            network="classifier",
            arguments={"num_classes": 4, "encoder": {**_ENCODER_ARGS, "init_filters": 8}, "head": "mlp"},
            files={"models/model.pt": "8b09d0f56af0c7475ad614181c0117d67f821d556d950bb75eed2cb523661673"},
            load_path="models/model.pt",
            url=None,
            licence="MIT",
            preprocessing={
                "orientation": "SPL",
                "spacing_mm": [5.0, 2.0, 2.0],
                "crop_foreground": "HU > 0",
                "pad_hu": -1024,
                "size": [48, 128, 128],
                "hu_windows": [[0, 80], [-125, 175], [28, 36], [-900, 2100]],
                "windows_stacked_along": "S",
            },
            description="ctfm_triage's demo weights (width 8, CT-FM's recipe), trained on synthetic head phantoms",
            bundle="ctfm_triage",
        ),
    ]
}


def cache_dir() -> Path:
    """Where fetched weights live: ``$CTFM_WEIGHTS_DIR``, default ``~/.cache/ctfm/weights``."""
    return Path(os.environ.get("CTFM_WEIGHTS_DIR") or Path.home() / ".cache" / "ctfm" / "weights")


def resolve(source: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> tuple[Path, dict[Path, str]]:
    """``(path to load, {file: expected sha256})`` for a table name or a path.

    A name of weights shipped in the running bundle (``bundle_root``'s folder name) resolves there; a published
    name to ``<bundle_root>/models/<name>/`` (where the bundle's ``large_files.yml`` puts it) or its cache folder;
    a shipped name also to its bundle as ``monai.bundle download`` placed it. A path is taken as it is; when it lies in a bundle folder of the table (a
    ``configs/metadata.json`` above it and that bundle's shipped files under it), those files' hashes apply.
    Configs resolve ``encoder_weights`` with ``@shipped_root``, the folder the config was read from
    (``ctfm.bundle.bundle_root()``), not ``@bundle_root``: a run folder given as ``--bundle_root`` holds none of the
    bundle's shipped files.

    Raises:
        CTFMError: a name whose files are not on this machine (the message says how to fetch them).
    """
    name = str(source)
    known = WEIGHTS.get(name)
    if known is None:
        path = Path(source)
        return path, _shipped_hashes(path)
    roots = [cache_dir() / known.name]
    if bundle_root is not None and not known.bundle:  # where the bundle's large_files.yml downloads it
        roots.insert(0, Path(bundle_root).resolve() / "models" / known.name)
    if known.bundle:
        roots.append(_downloaded_bundles() / known.bundle)
        if bundle_root is not None and Path(bundle_root).resolve().name == known.bundle:
            roots.insert(0, Path(bundle_root).resolve())
    copy = _copy_in_bundle(known, bundle_root)
    if copy is not None:
        return copy
    root = next((r for r in roots if all((r / rel).is_file() for rel in known.files)), roots[0])
    expected = {root / rel: digest for rel, digest in known.files.items() if digest}
    missing = [rel for rel in known.files if not (root / rel).is_file()]
    if missing:
        how = f"python -m ctfm.weights fetch {known.name}" + ("" if known.url else " --source <folder or URL>")
        raise CTFMError(f"{root / missing[0]}: weights '{known.name}' are not on this machine; run `{how}` or pass a path")
    return root / known.load_path, expected


def _copy_in_bundle(known: KnownWeights, bundle_root: str | os.PathLike | None) -> tuple[Path, dict[Path, str]] | None:
    """A copy of another bundle's shipped weights that the running bundle ships itself, as ``models/<name>/``
    holding the files under the row's ``load_path`` (e.g. ``ctfm_segmentation/models/ctfm_pretrain_demo/`` with
    the encoder's Hugging Face folder), with their recorded hashes; ``None`` where there is none."""
    if bundle_root is None or not known.bundle or Path(bundle_root).resolve().name == known.bundle:
        return None
    folder = Path(bundle_root).resolve() / "models" / known.name
    under = Path(known.load_path)
    files = {Path(rel).relative_to(under): digest for rel, digest in known.files.items() if under in Path(rel).parents}
    if not files or not all((folder / rel).is_file() for rel in files):
        return None
    return folder, {folder / rel: digest for rel, digest in files.items() if digest}


def _downloaded_bundles() -> Path:
    """Where ``monai.bundle download`` puts bundles by default (``<torch hub dir>/bundle``)."""
    import torch

    return Path(torch.hub.get_dir()) / "bundle"


def check_files(expected: Mapping[Path, str]) -> None:
    """Refuse any file whose sha256 differs from the recorded one (one line naming it)."""
    for path, digest in expected.items():
        actual = sha256sum(path)
        if actual != digest.lower():
            raise CheckpointError(f"{path}: sha256 {actual} differs from the recorded {digest}: damaged or replaced weights")


def load(network: nn.Module, source: str | os.PathLike, bundle_root: str | os.PathLike | None = None,
         adapt_stem: bool = False) -> nn.Module:
    """``network`` with every weight of ``source`` (a table name or a path) loaded, after the hash check.

    ``adapt_stem``: a first layer of other input channels initialises ``network``'s
    (:func:`~ctfm.networks.encoder.adapt_input_conv`), e.g. continuing CT-FM's one-channel pre-training with FM-CT's
    three HU windows as channels; every other weight is still required.

    Raises:
        CheckpointError: unreadable or damaged file, a key of ``network`` missing, shapes that differ.
    """
    path, expected = resolve(source, bundle_root)
    check_files(expected)
    report = load_weights(network, path, strict=True, adapt_stem=adapt_stem)
    logger.info("network weights: %s", report.summary())
    return network


def init_encoder(network: nn.Module, source: str | os.PathLike | None, bundle_root: str | os.PathLike | None = None) -> nn.Module:
    """``network`` with ``network.encoder`` initialised from ``source`` (an encoder, a segmentation network, a
    Lightning checkpoint: any layout of :mod:`ctfm.checkpoint`; a one-channel stem adapts to an encoder of more
    input channels); the rest keeps its initialisation. ``None``
    leaves the network as it is (training from scratch)."""
    if source is None or str(source) == "":
        logger.info("encoder: random initialisation")
        return network
    path, expected = resolve(source, bundle_root)
    check_files(expected)
    report = load_weights(network.encoder, path, strict=True, adapt_stem=True)
    logger.info("encoder initialised from %s", report.summary())
    return network


def fetch(name: str, source: str | os.PathLike | None = None, dest: str | os.PathLike | None = None) -> Path:
    """Download (or copy) the files of table entry ``name`` into ``dest`` (default its cache folder), atomically.

    Args:
        name: a key of :data:`WEIGHTS`.
        source: where to take the files from instead of the table's URL: a base URL (``http(s)://`` or
            ``file://``) or a local folder laid out as the weights' folder (a bundle folder for shipped weights).
        dest: the folder to create.

    Each file's sha256 is checked against the table, and against the ``X-Linked-Etag`` that Hugging Face serves
    for LFS files; where the table has none yet, the computed one is logged for recording.

    Raises:
        CTFMError: unknown name, no source, a download error, a hash mismatch.
    """
    if name not in WEIGHTS:
        raise CTFMError(f"{name}: no such weights; known: {', '.join(sorted(WEIGHTS))}")
    known = WEIGHTS[name]
    base = str(source) if source is not None else known.url
    if base is None:
        raise CTFMError(f"{name}: the table has no URL for these weights; pass --source (a folder or URL)")
    dest = Path(dest) if dest is not None else cache_dir() / name
    with atomic_path(dest, is_dir=True) as out:
        for rel, digest in known.files.items():
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            copied = copy_to(join(base, rel), target)
            actual = copied.sha256
            for what, wanted in (("the table's", digest), ("the server's", copied.served_sha256)):
                if wanted and actual != wanted.lower():
                    raise CTFMError(f"{join(base, rel)}: sha256 {actual} differs from {what} {wanted}")
            if not digest:
                logger.warning("%s: sha256 %s (not yet in the weights table: record it)", rel, actual)
    logger.info("fetched %s into %s", name, dest)
    return dest


def _shipped_hashes(path: Path) -> dict[Path, str]:
    """The recorded hashes of the shipped files at or under ``path``, if ``path`` lies in a bundle of the table."""
    path = path.resolve()
    for bundle in [path, *path.parents]:
        if (bundle / "configs" / "metadata.json").is_file():
            break
    else:
        return {}
    hashes = {}
    for known in WEIGHTS.values():
        if known.bundle != bundle.name:
            continue
        for rel, digest in known.files.items():
            file = bundle / rel
            if digest and (file == path or path in file.parents) and file.is_file():
                hashes[file] = digest
    return hashes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfm.weights list | path NAME | fetch NAME [--source S] [--dest D]``."""
    install_excepthook()
    parser = argparse.ArgumentParser(prog="python -m ctfm.weights", description="The table of known weights.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every known weight, one line each")
    path = commands.add_parser("path", help="where NAME's weights are on this machine")
    path.add_argument("name")
    get = commands.add_parser("fetch", help="download NAME's files into the cache, checking their sha256")
    get.add_argument("name")
    get.add_argument("--source", help="a folder or base URL to take the files from instead of the table's URL")
    get.add_argument("--dest", help="the folder to create (default: the cache)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for w in WEIGHTS.values():
            where = f"bundle {w.bundle}" if w.bundle else w.url
            print(f"{w.name}\t{w.network}\t{w.licence}\t{where}\t{w.description}")
    elif args.command == "path":
        print(resolve(args.name)[0])
    else:
        print(fetch(args.name, args.source, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
