"""Which CTs a run reads, as ``[{"image": path, ...}]``, and how its outputs are named after them.

Every bundle takes MONAI's ``dataset_dir`` (the folder the data is in) and ``datalist`` (what to read there),
as the model zoo's configs do; :func:`find_inputs` turns the pair into a datalist. :func:`output_stem` names an
output after its input's path relative to ``dataset_dir``, so two inputs of one run never share an output.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ctfm.errors import CTFMError

__all__ = ["CT_SUFFIXES", "OutputGuard", "find_cts", "find_inputs", "is_dicom_file", "load_datalist", "output_stem"]

CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The model zoo's (MSD's) image folder per datalist section.
ZOO_IMAGE_FOLDERS = {"test": "imagesTs", "training": "imagesTr", "validation": "imagesTr"}


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 DICOM file (``DICM`` at byte 128) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_cts(folder: str | os.PathLike) -> list[str]:
    """CT volumes below ``folder``: image files by suffix, and each folder that holds DICOM files (one series).

    Returns sorted absolute paths.

    Raises:
        CTFMError: ``folder`` is missing or holds no CT.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CTFMError(f"{folder}: no such folder of CTs")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images = [f for f in files if f.lower().endswith(CT_SUFFIXES) and not f.startswith(".")]
        found += [str(Path(root, f).resolve()) for f in images]
        if not images and any(is_dicom_file(Path(root, f)) for f in files[:5]):
            found.append(str(Path(root).resolve()))
    if not found:
        raise CTFMError(f"{folder}: holds no CT ({', '.join(CT_SUFFIXES)} files or DICOM series folders)")
    return sorted(found)


def load_datalist(source: str | os.PathLike, section: str = "training", key: str = "image") -> list[dict]:
    """``[{key: path, ...}]`` from one CT, a folder of CTs, or a datalist JSON (MONAI's decathlon layout or a list).

    Relative paths in a JSON are resolved against the JSON's folder; a missing listed file is an error here,
    not hours into a run.
    """
    source = Path(source)
    if source.is_dir():
        return [{key: path} for path in find_cts(source)]
    if source.name.lower().endswith(CT_SUFFIXES) and source.is_file():
        return [{key: str(source.resolve())}]
    if not source.is_file():
        raise CTFMError(f"{source}: no such datalist JSON or folder of CTs")
    try:
        content = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise CTFMError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
    items = content.get(section) if isinstance(content, dict) else content
    if not isinstance(items, list) or not items:
        raise CTFMError(f"{source}: no non-empty list '{section}' of CTs")
    datalist = []
    for item in items:
        item = dict(item) if isinstance(item, dict) else {key: item}
        if key not in item:
            raise CTFMError(f"{source}: an entry has no '{key}' key: {item}")
        for k, v in item.items():
            if isinstance(v, str) and not Path(v).is_absolute() and (source.parent / v).exists():
                item[k] = str((source.parent / v).resolve())
        if not Path(item[key]).exists():
            raise CTFMError(f"{source}: listed CT {item[key]} does not exist")
        datalist.append(item)
    return datalist


def find_inputs(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike | Sequence | None = None,
    section: str = "test",
    key: str = "image",
) -> list[dict]:
    """The datalist of a run from the bundle's ``dataset_dir`` and ``datalist`` ids.

    Args:
        dataset_dir: the data folder (relative entries of ``datalist`` are taken from here); a single CT file,
            a DICOM series folder or a datalist JSON is also accepted.
        datalist: what to read, as the model zoo writes it or as this project always accepted it:

            - ``None`` or ``""``: the zoo's layout of ``dataset_dir``: the ``section`` of its ``dataset.json``
              (MSD's layout), else the CTs in its ``imagesTs/`` (``imagesTr/`` for training), else every CT below it;
            - a glob such as ``"imagesTs/*.nii.gz"`` (relative to ``dataset_dir`` unless absolute; ``**`` recurses);
            - a path: a CT file, a DICOM series folder, a folder of CTs or a datalist JSON (its ``section``);
            - a list of such paths or of ``{key: path, ...}`` dicts.
        section: datalist / ``dataset.json`` section (``"test"`` for inference, ``"training"`` for training).
        key: the image key of the returned dicts.

    Returns:
        ``[{key: absolute path, ...}]`` in a stable order.

    Raises:
        CTFMError: a missing folder or file, a glob that matches nothing, an empty or malformed datalist.
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise CTFMError(f"{root}: no such dataset_dir")
    if datalist is None or (isinstance(datalist, str) and not datalist.strip()):
        if root.is_dir() and (root / "dataset.json").is_file():
            return load_datalist(root / "dataset.json", section=section, key=key)
        folder = root / ZOO_IMAGE_FOLDERS.get(section, "imagesTs")
        return load_datalist(folder if folder.is_dir() else root, section=section, key=key)
    if isinstance(datalist, (list, tuple)):
        items = [dict(i) if isinstance(i, dict) else {key: str(i)} for i in datalist]
        if not items:
            raise CTFMError(f"{root}: empty datalist")
        for item in items:
            if key not in item:
                raise CTFMError(f"{root}: a datalist entry has no '{key}' key: {item}")
            for k, v in item.items():
                if isinstance(v, (str, os.PathLike)) and not Path(v).is_absolute() and (root / v).exists():
                    item[k] = str((root / v).resolve())
            if not Path(item[key]).exists():
                raise CTFMError(f"{root}: listed CT {item[key]} does not exist")
        return items
    text = str(datalist)
    if glob.has_magic(text):
        pattern = text if Path(text).is_absolute() else str(root / text)
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if not Path(p).name.startswith("."))
        if not matches:
            raise CTFMError(f"{root}: datalist {text!r} matches no file")
        return [{key: str(Path(p).resolve())} for p in matches]
    path = Path(text) if Path(text).is_absolute() else root / text
    return load_datalist(path, section=section, key=key)


def output_stem(source: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """An input's name for its outputs: its path relative to ``root`` without the image extension.

    ``output_stem("/data/s1/ct.nii.gz", "/data") == "s1/ct"``; an input outside ``root`` (or with no ``root``)
    keeps only its own name; a DICOM series folder keeps its folder name. ``root`` may also be a file (a single
    CT or a datalist JSON), whose folder is then the root.
    """
    path = Path(source).resolve()
    relative = Path(path.name)
    if root is not None:
        base = Path(root).resolve()
        base = base.parent if base.is_file() else base
        try:
            inside = path.relative_to(base)
            if inside.parts:
                relative = inside
        except ValueError:
            pass
    name = relative.name
    for suffix in CT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return (relative.parent / name).as_posix()


class OutputGuard:
    """Refuses to let one input's output replace another's: within a run (two inputs named alike) and across
    runs (an output already in the folder, made from another input).

    Args:
        recorded_source: reads the input recorded in an existing output (``None`` when it records none), e.g. a
            NIfTI comment extension or safetensors metadata written with the output.
    """

    def __init__(self, recorded_source: Callable[[Path], str | None]):
        self.recorded_source = recorded_source
        self.written: dict[Path, str] = {}

    def check(self, source: str | os.PathLike, output: Path) -> None:
        """Raise a one-line :class:`CTFMError` unless ``output`` is free for ``source`` or was made from it."""
        earlier = self.written.get(output)
        if earlier is None and output.exists():
            earlier = self.recorded_source(output)
            if earlier is None:
                raise CTFMError(
                    f"{output}: exists and does not say which input it was made from; "
                    f"move it away or choose another output_dir before writing the output of {source}"
                )
        if earlier is not None and Path(earlier).resolve() != Path(source).resolve():
            raise CTFMError(
                f"{source}: its output {output} is the output of another input ({earlier}); "
                "set data_root_dir (dataset_dir) to the inputs' common folder or give them distinct names"
            )

    def done(self, source: str | os.PathLike, output: Path) -> None:
        """Record that ``output`` now holds ``source``'s result."""
        self.written[output] = str(source)
