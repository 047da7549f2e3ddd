"""Check that a bundle has what MONAI, MONAI Label, MONAI Deploy and the MONAI model zoo expect.

    python ci/verify_bundle.py [bundles/NAME ...] [--full] [--monai]

Prints one line per problem (on stderr) and exits 1 if there is any.

The model zoo's own CI (github.com/Project-MONAI/model-zoo, read at dfae206: ``ci/verify_bundle.py``,
``ci/utils.py``, ``ci/bundle_custom_data.py``, ``ci/get_bundle_requirements.py``, ``ci/update_model_info.py``,
``ci/run_premerge_{cpu,gpu}.sh``, ``ci/unit_tests/``) runs these checks; the right-hand column says what this file
does with each (own code, nothing copied).

=============================================  ==========================================================
model-zoo check                                here
=============================================  ==========================================================
``verify_bundle_directory``: download the      ``check_large_files`` (default): ``large_files.yml`` (or
large files of ``large_files.{yml,yaml,json}``  .yaml/.json) parses; every entry has ``path`` (relative,
(``utils.download_large_files``)               inside the bundle), an http(s) ``url``, ``hash_val`` (empty,
                                               or a lower-case hex digest of the length ``hash_type``
                                               gives) and a ``hash_type`` MONAI's ``download_url``
                                               supports. Nothing is downloaded (offline machines).
``verify_bundle_directory``: necessary files   ``check_files`` (default); we also require
``configs/metadata.json``, ``LICENSE``;        ``configs/logging.conf``, ``docs/README.md`` and
preferred files ``models/model.pt``,           ``large_files.yml``. ``check_logging_conf`` (default): the
``configs/inference.{json,yaml,yml}``          logging file has the sections ``logging.config`` needs.
``verify_version_changes``: ``version`` and    ``check_metadata`` (default): both present, ``version`` is
``changelog`` present, version in changelog,   X.Y.Z, listed in ``changelog`` and not lower than any
version not already released (model_info)      changelog entry. The "already released" half needs the
                                               zoo's ``models/model_info.json``; ``released_versions``
                                               takes such a file (``--model-info``) when there is one.
``verify_metadata_format`` (``prepare_schema``  ``check_metadata`` (default): ``metadata.json`` against the
downloads the ``schema`` URL, then             real schema, stored offline as ``ci/meta_schema_20240725.json``
``monai.bundle.verify_metadata``)              (source and sha256 in ``ci/SCHEMAS.md``), with the validator
                                               class the schema's ``$schema`` names, as MONAI's
                                               ``jsonschema.validate`` does; the ``schema`` URL must name a
                                               schema stored here. ``monai_verify_metadata`` (``--monai``,
                                               ``--full``): MONAI's own command in a subprocess, offline.
``get_bundle_requirements`` (pip-installs      ``check_metadata`` (default): every version there is a
``monai==``, ``torch==``, ``numpy==`` and each  valid PEP 440 version; ``ctfm`` must be listed at the version
``required/optional_packages_version`` pin)    ``pyproject.toml`` builds; every package the bundle's code
                                               imports is declared (``ci/check_packages.py``); optional
                                               packages go in ``optional_packages``, never in MONAI's
                                               deprecated ``optional_packages_version``.
``_get_net_io_info`` / ``verify_net_in_out``   ``check_data_format`` (default, static): ``inputs.image`` and
reads ``inputs.image`` and ``outputs.pred``    ``outputs.pred`` exist with an int ``num_channels``, a dtype
                                               MONAI can map and a ``spatial_shape`` of ints, "*" or
                                               expressions in ``n``/``p`` ("16*n", "2**p").
``verify_data_shape`` = ``verify_net_in_out``  ``check_net_in_out`` (``--full``): MONAI's
(GPU premerge, ``network_def`` of the          ``verify_net_in_out`` on CPU, then our own forward pass at
inference config)                              n=1 and n=2 that also compares the output's spatial shape
                                               with ``outputs.pred.spatial_shape``.
``verify_torchscript`` (``ckpt_export`` of     ``check_ckpt_export`` (``--full``): ``ckpt_export`` into a
``models/model.pt``, ``torch.jit.load`` of     temporary folder (never into the bundle), then
``models/model.ts`` if shipped)                ``torch.jit.load`` of it and of ``models/model.ts`` if there.
``verify_bundle_properties`` /                 ``check_property_ids`` (``--full``, static): the ids MONAI's
``check_properties`` (``create_workflow`` on   ``InferProperties``/``TrainProperties`` require exist in
the inference config); ``ci/unit_tests``:      ``inference.json``/``train.json`` (``bundle_root``,
``ConfigWorkflow(workflow_type="train" |       ``dataset_dir``, ``device``, ``train#trainer`` ...), optional
"infer").initialize(); check_properties()``    ones that are referenced point where MONAI expects.
then ``run()`` on synthetic data               ``check_properties`` (``--full``): ``ConfigWorkflow(...)
                                               .initialize()`` and ``.check_properties()`` for infer and
                                               train. Running the workflows stays in tests/test_*_bundle.py.
``ci/unit_tests/*_dist.py``: multi-GPU runs    not ported here (``check_config`` parses
with torchrun                                  ``multi_gpu_train.json`` merged onto ``train.json``).
``verify_tensorrt.py`` (``trt_export`` for     not ported: GPU + TensorRT only, and keyed on the zoo's own
bundles listed in ``bundle_custom_data``)      bundle names.
``code-format-check`` (flake8/black/isort)     not ported: the repository's own lint settings apply.
``update_model_info.compress_bundle``          ``ci/package_bundle.py``: fixed timestamps, level 9, no
(``touch -t 202205300000``; ``zip -D -X -9``)  directory entries or extra fields, plus sorted members and
and a sha1 checksum                            fixed modes; prints the zip's sha256.
=============================================  ==========================================================

Our own checks besides: every config parses (override files merged onto their base), every ``@id`` reference
resolves and ``network_def`` instantiates (``check_config``); no symlink anywhere in the bundle
(``check_symlinks``; the packager would otherwise have to pack a link target's content).

The ``--full`` checks (``check_property_ids``, ``check_properties``, ``check_net_in_out``, ``check_ckpt_export``,
``check_onnx_export``, ``monai_verify_metadata``) take about a minute per bundle; ``make test`` (CI) runs them.
``check_properties`` gives the train configs a weights cache holding the shipped weights of the other bundles
(as ``python -m ctfm.weights fetch NAME --source BUNDLE`` makes it), as the zoo's tests give a train config its data.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import hashlib
import json
import operator
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import torch
import yaml
from monai.apps.utils import SUPPORTED_HASH_TYPES
from monai.bundle import ConfigParser
from monai.utils import get_equivalent_dtype
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from check_packages import check_packages

from ctfm.files import sha256sum
from ctfm.registry.archive import check_symlinks, path_problem

CI_DIR = Path(__file__).resolve().parent
#: Metadata schemas stored here (see SCHEMAS.md): file name -> sha256 of the file.
SCHEMAS = {"meta_schema_20240725.json": "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"}
#: Where a bundle's ``schema`` URL may point: MONAI-extra-test-data's release (what the model zoo's bundles use) or
#: the same files on project-monai.github.io.
SCHEMA_URL_PREFIXES = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/",
    "https://project-monai.github.io/schema/",
)
#: model zoo: necessary files (``verify_bundle_directory``).
NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
#: model zoo: preferred files; ``configs/inference.*`` is looked for with any config suffix.
PREFERRED_FILES = ("models/model.pt",)
#: ours: what MONAI Label / Deploy users and the registry need besides.
OUR_REQUIRED_FILES = ("configs/logging.conf", "docs/README.md", "large_files.yml")
REQUIRED_FILES = NECESSARY_FILES + PREFERRED_FILES + OUR_REQUIRED_FILES
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
#: An override config (no ``bundle_root`` of its own) is checked merged onto this base config.
OVERRIDE_BASES = {"multi_gpu_train": "train", "evaluate": "train", "multi_gpu_evaluate": "train"}
#: Stems of the infer config, in order of preference (:func:`infer_config`).
INFER_STEMS = ("inference", "extract")
#: hash_type -> number of hex digits of its digest, for every hash MONAI's ``download_url`` supports.
HASH_HEX_LENGTHS = {name: 2 * hashlib.new(name).digest_size for name in SUPPORTED_HASH_TYPES}
_REFERENCE = re.compile(r"@([\w#]+(?:::[\w#]+)*)")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
#: Proxy that refuses every connection: MONAI's verify_metadata must find the schema on disk, never download it.
_NO_NETWORK = "http://127.0.0.1:9"


# ---------------------------------------------------------------- helpers


def find_config(bundle: Path, stem: str) -> Path | None:
    """``configs/<stem>.json|yaml|yml`` (the model zoo's ``_find_bundle_file``), or None."""
    return next((p for s in CONFIG_SUFFIXES if (p := bundle / "configs" / f"{stem}{s}").is_file()), None)


def config_files(bundle: Path) -> list[Path]:
    return sorted(p for p in (bundle / "configs").iterdir() if p.suffix in CONFIG_SUFFIXES and p.stem != "metadata")


def infer_config(bundle: Path) -> Path | None:
    """The config MONAI's infer workflow reads: ``inference.json``, or for a bundle whose inference is an
    embedding pass and which ships no such file, ``extract.json`` (ctfm_retrieval)."""
    return next((c for stem in INFER_STEMS if (c := find_config(bundle, stem)) is not None), None)


def base_of(config: Path) -> str:
    """The config an override file is merged onto: its named base, ``inference`` for ``inference_*``, else
    ``train``, or the infer config in a bundle that has no train config."""
    stem, bundle = config.stem, config.parents[1]
    if stem.startswith("inference_"):
        return "inference"
    if find_config(bundle, "train") is None and (infer := infer_config(bundle)) is not None:
        return infer.stem
    return OVERRIDE_BASES.get(stem) or "train"


def _load_metadata(bundle: Path) -> tuple[dict | None, list[str]]:
    path = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, [f"{path}: unreadable ({err})"]
    if not isinstance(meta, dict):
        return None, [f"{path}: not a JSON object"]
    return meta, []


def _first_line(err: BaseException) -> str:
    """``Type: message`` on one line; MONAI's "Failed to evaluate ConfigExpression:" gets the expression and cause."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    summary = f"{type(err).__name__}: {text}"
    if err.__cause__ is not None and err.__cause__ is not err:
        summary += f" <- {_first_line(err.__cause__)}"
    return summary[:400]


# ---------------------------------------------------------------- spatial_shape expressions

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow,
        ast.FloorDiv: operator.floordiv}


def _eval_dim(node: ast.AST, n: int, p: int) -> int:
    if isinstance(node, ast.Expression):
        return _eval_dim(node.body, n, p)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id in ("n", "p"):
        return n if node.id == "n" else p
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_dim(node.left, n, p), _eval_dim(node.right, n, p)
        if isinstance(node.op, ast.Pow) and (right > 16 or left > 4096):
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"unsupported element {ast.dump(node)[:40]}")


def spatial_dims(shape: Iterable, n: int = 1, p: int = 1, any_: int = 1) -> tuple[int, ...]:
    """A ``spatial_shape`` evaluated as MONAI's ``verify_net_in_out`` does: ints, "*" (any size) or expressions in
    ``n`` (multiple) and ``p`` (power), e.g. "16*n", "2**p", "32**p*n". ValueError on anything else."""
    dims = []
    for item in shape:
        if type(item) is int:
            dims.append(item)
        elif isinstance(item, str):
            dims.append(any_ if item.strip() == "*" else _eval_dim(ast.parse(item.strip(), mode="eval"), n, p))
        else:
            raise ValueError(f"{item!r} is neither an int nor a string")
        if dims[-1] < 1:
            raise ValueError(f"{item!r} gives {dims[-1]} at n={n}, p={p}")
    return tuple(dims)


# ---------------------------------------------------------------- default checks


def check_files(bundle: Path) -> list[str]:
    problems = [f"{bundle}: missing {name}" for name in REQUIRED_FILES if not (bundle / name).is_file()]
    if (bundle / "configs").is_dir() and infer_config(bundle) is None:
        problems.append(f"{bundle}: missing configs/inference.json (or .yaml/.yml; extract.json for an embedding bundle)")
    return problems


def local_schema(meta: dict, where: Path | str) -> tuple[Path | None, list[str]]:
    """The stored schema that ``meta["schema"]`` names, checked against its recorded sha256."""
    url = meta.get("schema")
    if not isinstance(url, str) or not url:
        return None, [f"{where}: no 'schema' URL"]
    name = url.rsplit("/", 1)[-1]
    if not url.startswith(SCHEMA_URL_PREFIXES) or name not in SCHEMAS:
        known = ", ".join(p + n for p in SCHEMA_URL_PREFIXES[:1] for n in SCHEMAS)
        return None, [f"{where}: schema {url} is not one stored in ci/ (known: {known})"]
    path = CI_DIR / name
    if not path.is_file():
        return None, [f"{path}: missing (see ci/SCHEMAS.md)"]
    if sha256sum(path) != SCHEMAS[name]:
        return None, [f"{path}: sha256 differs from the one recorded in ci/SCHEMAS.md ({SCHEMAS[name]})"]
    return path, []


def check_versions(meta: dict, path: Path) -> list[str]:
    problems = []
    version, changelog = meta.get("version"), meta.get("changelog")
    if not isinstance(changelog, dict) or not changelog:
        problems.append(f"{path}: no 'changelog' (the model zoo requires one)")
        changelog = {}
    if not isinstance(version, str) or not _VERSION.match(version):
        problems.append(f"{path}: version {version!r} is not X.Y.Z")
    elif version not in changelog:
        problems.append(f"{path}: version {version} is not in changelog")
    else:
        newer = [v for v in changelog if _VERSION.match(v) and Version(v) > Version(version)]
        if newer:
            problems.append(f"{path}: version {version} is lower than changelog entries {', '.join(sorted(newer))}")
    bad_keys = [v for v in changelog if not _VERSION.match(str(v))]
    if bad_keys:
        problems.append(f"{path}: changelog keys {bad_keys} are not X.Y.Z")
    pins = {k: meta.get(k) for k in ("monai_version", "pytorch_version", "numpy_version")}
    for name, value in (meta.get("required_packages_version") or {}).items():
        pins[f"required_packages_version.{name}"] = value
    for key, value in pins.items():
        if value is None:
            continue
        try:
            Version(str(value))
        except InvalidVersion:
            problems.append(f"{path}: {key} {value!r} is not a version pip can pin ({key.split('.')[-1]}=={value})")
    if "optional_packages_version" in meta:
        problems.append(f"{path}: optional_packages_version is MONAI's deprecated name of required_packages_version "
                        "(MONAI replaces that list with it); use optional_packages (see ci/check_packages.py)")
    for group, packages in (meta.get("optional_packages") or {}).items():
        for name, value in (packages or {}).items():
            try:
                Version(str(value)) if str(value)[:1].isdigit() else SpecifierSet(str(value))
            except (InvalidVersion, InvalidSpecifier):
                problems.append(f"{path}: optional_packages[{group!r}].{name} {value!r} is neither a version nor a "
                                "version range pip understands")
    pin = (meta.get("required_packages_version") or {}).get("ctfm")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    if pin is None:
        problems.append(f"{path}: required_packages_version does not list ctfm, which the configs import")
    elif str(pin) != project:
        problems.append(f"{path}: requires ctfm {pin}, but this repository builds ctfm {project} (pyproject.toml)")
    return problems + check_packages(path.parent.parent)


def check_data_format(meta: dict, path: Path) -> list[str]:
    """What MONAI's ``_get_net_io_info`` reads from ``network_data_format``, checked without a network."""
    fmt = meta.get("network_data_format")
    if not isinstance(fmt, dict):
        return []  # the schema reports it
    problems = []
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        entry = (fmt.get(side) or {}).get(key) if isinstance(fmt.get(side), dict) else None
        if entry is None:
            problems.append(f"{path}: network_data_format.{side} has no '{key}'")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{path}: network_data_format.{side}.{key} is not an object")
            continue
        where = f"{path}: network_data_format.{side}.{key}"
        if type(entry.get("num_channels")) is not int or entry["num_channels"] < 1:
            problems.append(f"{where}.num_channels {entry.get('num_channels')!r} is not a positive int")
        try:
            get_equivalent_dtype(entry.get("dtype"), torch.Tensor)
        except Exception as err:
            problems.append(f"{where}.dtype {entry.get('dtype')!r} is not one MONAI maps to torch ({_first_line(err)})")
        shape = entry.get("spatial_shape")
        if not isinstance(shape, list):
            problems.append(f"{where}.spatial_shape is not a list")
            continue
        for n, p in ((1, 1), (2, 2)):
            try:
                spatial_dims(shape, n=n, p=p)
            except (ValueError, SyntaxError, TypeError) as err:
                problems.append(f"{where}.spatial_shape {shape}: {err}")
                break
    inputs, outputs = (fmt.get("inputs") or {}).get("image"), (fmt.get("outputs") or {}).get("pred")
    if isinstance(inputs, dict) and isinstance(outputs, dict) and inputs.get("type") == outputs.get("type") == "image":
        if len(inputs.get("spatial_shape") or []) != len(outputs.get("spatial_shape") or []):
            problems.append(f"{path}: network_data_format: image input and image output differ in spatial rank")
    return problems


def check_metadata(bundle: Path) -> list[str]:
    path = bundle / "configs" / "metadata.json"
    meta, problems = _load_metadata(bundle)
    if meta is None:
        return problems
    schema_path, problems = local_schema(meta, path)
    if schema_path is not None:
        schema = json.loads(schema_path.read_text())
        validator = jsonschema.validators.validator_for(schema)(schema)
        problems += [f"{path}: {e.json_path}: {e.message}" for e in sorted(validator.iter_errors(meta), key=str)]
    return problems + check_versions(meta, path) + check_data_format(meta, path)


def released_versions(model_info: Path | None) -> set[str]:
    """``<bundle>_v<version>`` keys of a model-zoo ``models/model_info.json``; empty without one."""
    if model_info is None or not Path(model_info).is_file():
        return set()
    return set(json.loads(Path(model_info).read_text()))


def check_version_not_released(bundle: Path, released: set[str]) -> list[str]:
    meta, problems = _load_metadata(bundle)
    if meta is None:
        return problems
    key = f"{bundle.name}_v{meta.get('version')}"
    return [f"{bundle}: version {meta.get('version')} is already released ({key}); bump it"] if key in released else []


def check_logging_conf(bundle: Path) -> list[str]:
    path = bundle / "configs" / "logging.conf"
    if not path.is_file():
        return []
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
    except (configparser.Error, OSError) as err:
        return [f"{path}: does not parse ({_first_line(err)})"]
    problems = [f"{path}: no [{s}] section" for s in ("loggers", "handlers", "formatters") if not parser.has_section(s)]
    for section, kind in (("loggers", "logger"), ("handlers", "handler"), ("formatters", "formatter")):
        if parser.has_section(section):
            for name in filter(None, (k.strip() for k in parser.get(section, "keys", fallback="").split(","))):
                if not parser.has_section(f"{kind}_{name}"):
                    problems.append(f"{path}: [{section}] lists {name} but there is no [{kind}_{name}]")
    return problems


def check_config(bundle: Path, config: Path) -> list[str]:
    parser = ConfigParser()
    try:
        content = ConfigParser.load_config_file(config)
        files = [config]
        if "bundle_root" not in content:
            base = next((p for p in config_files(bundle) if p.stem == base_of(config)), None)
            if base is None:
                return [f"{config}: override config without a '{base_of(config)}' base config"]
            files = [base, config]
        parser.read_config(files)
        parser["bundle_root"] = str(bundle)
        flat = json.dumps(parser.get())
        problems = []
        for ref in sorted(set(_REFERENCE.findall(flat))):
            if ref not in parser:
                problems.append(f"{config}: reference @{ref} does not resolve")
        if not problems and "network_def" in parser:
            parser.get_parsed_content("network_def", instantiate=True)
        return problems
    except Exception as err:  # any parse or instantiation failure is a finding, not a crash
        return [f"{config}: does not parse ({_first_line(err)})"]


def check_large_files(bundle: Path) -> list[str]:
    path = next((p for s in (".yml", ".yaml", ".json") if (p := bundle / f"large_files{s}").is_file()), None)
    if path is None:
        return []
    try:
        content = yaml.safe_load(path.read_text()) or {}  # JSON is YAML too
    except (yaml.YAMLError, OSError) as err:
        return [f"{path}: does not parse ({_first_line(err)})"]
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        return [f"{path}: no 'large_files' list"]
    problems, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{path}: entry {i} is not a mapping")
            continue
        where = f"{path}: entry {entry.get('path', i)}"
        problems += [f"{where} lacks {key}" for key in ("path", "url", "hash_val", "hash_type") if key not in entry]
        problems += [f"{where}: {key} is empty" for key in ("path", "url", "hash_type") if key in entry and not entry[key]]
        rel = str(entry.get("path") or "")
        if rel:
            if path_problem(rel):
                problems.append(f"{where}: path must be relative and inside the bundle ({path_problem(rel)})")
            if rel in seen:
                problems.append(f"{where}: listed twice")
            seen.add(rel)
        url = entry.get("url")
        if url and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            problems.append(f"{where}: url {url!r} is not http(s)")
        hash_type = entry.get("hash_type")
        if hash_type and (not isinstance(hash_type, str) or hash_type.lower() not in SUPPORTED_HASH_TYPES):
            problems.append(f"{where}: hash_type {hash_type!r} is not one MONAI supports ({', '.join(SUPPORTED_HASH_TYPES)})")
            hash_type = None
        hash_val = entry.get("hash_val")
        if hash_val in (None, ""):
            continue  # MONAI (and the model zoo's download_large_files) skip the check for an empty hash_val
        if not isinstance(hash_val, str):
            problems.append(f"{where}: hash_val {hash_val!r} is not a string (quote it in YAML)")
            continue
        length = HASH_HEX_LENGTHS.get(str(hash_type or "").lower())
        if not re.fullmatch(r"[0-9a-fA-F]+", hash_val):
            problems.append(f"{where}: hash_val {hash_val!r} is not a hex digest")
        elif length is not None and len(hash_val) != length:
            problems.append(f"{where}: hash_val has {len(hash_val)} hex digits, a {hash_type} digest has {length}")
        elif hash_val != hash_val.lower():
            # monai.apps.utils.check_hash compares the string with hexdigest(), which is lower case
            problems.append(f"{where}: hash_val must be lower case (MONAI compares it with hexdigest() as written)")
    return problems


# ---------------------------------------------------------------- --full checks


def _workflow_config(bundle: Path, workflow_type: str) -> Path | None:
    return infer_config(bundle) if workflow_type == "infer" else find_config(bundle, "train")


def check_property_ids(bundle: Path) -> list[str]:
    """The config ids MONAI's ``InferProperties`` (inference config) and ``TrainProperties`` (train config) require,
    looked up without instantiating anything; referenced optional ones must point where MONAI expects."""
    from monai.bundle.properties import InferProperties, TrainProperties
    from monai.utils import BundleProperty, BundlePropertyConfig

    problems = []
    for workflow_type, properties in (("infer", InferProperties), ("train", TrainProperties)):
        config = _workflow_config(bundle, workflow_type)
        if config is None and workflow_type == "train" and infer_config(bundle) is not None and infer_config(bundle).stem == "extract":
            continue  # a frozen-encoder bundle (ctfm_retrieval) trains nothing
        if config is None:
            problems.append(f"{bundle}: no {'inference' if workflow_type == 'infer' else 'train'} config")
            continue
        parser = ConfigParser()
        parser.read_config(config)
        for name, prop in properties.items():
            prop_id = prop[BundlePropertyConfig.ID]
            if prop.get(BundleProperty.REQUIRED) and prop_id not in parser:
                problems.append(f"{config}: {workflow_type} property '{name}' needs the id '{prop_id.replace('::', '#')}'")
            ref_id = prop.get(BundlePropertyConfig.REF_ID)
            if ref_id and name not in ("evaluator", "val_interval") and ref_id in parser:
                ref = parser[ref_id]
                if isinstance(ref, str) and not ref.startswith("$") and ref.replace("::", "#") != "@" + prop_id.replace("::", "#"):
                    problems.append(f"{config}: '{ref_id.replace('::', '#')}' is {ref!r}; MONAI expects @{prop_id.replace('::', '#')}")
    return problems


def check_properties(bundle: Path) -> list[str]:
    """``ConfigWorkflow(workflow_type=...).initialize()`` then ``check_properties()`` for the inference and train
    configs, as the model zoo's unit tests do (train with ``num_workers`` 0 and ``cache_rate`` 0 where defined)."""
    from monai.bundle import ConfigWorkflow

    problems = []
    with _fetched_shipped_weights(bundle.parent):
        for workflow_type in ("infer", "train"):
            problems += _check_workflow(bundle, workflow_type, ConfigWorkflow)
    return problems


@contextlib.contextmanager
def _fetched_shipped_weights(bundles: Path):
    """A weights cache (``CTFM_WEIGHTS_DIR``) holding every shipped weight of the table that ``bundles`` has, as a
    user has it after ``python -m ctfm.weights fetch NAME --source <bundle>``: a train config may name another
    bundle's weights (ctfm_segmentation fine-tunes ``ctfm_pretrain_demo``), and no bundle reads another's folder."""
    from ctfm.weights import WEIGHTS, fetch

    before = os.environ.get("CTFM_WEIGHTS_DIR")
    with tempfile.TemporaryDirectory() as cache:
        for known in WEIGHTS.values():
            if known.bundle and (bundles / known.bundle).is_dir():
                fetch(known.name, source=bundles / known.bundle, dest=Path(cache) / known.name)
        os.environ["CTFM_WEIGHTS_DIR"] = cache
        try:
            yield Path(cache)
        finally:
            if before is None:
                os.environ.pop("CTFM_WEIGHTS_DIR", None)
            else:
                os.environ["CTFM_WEIGHTS_DIR"] = before


def _check_workflow(bundle: Path, workflow_type: str, ConfigWorkflow) -> list[str]:
    config = _workflow_config(bundle, workflow_type)
    if config is None:
        return []
    content = ConfigParser.load_config_file(config)
    override = {"bundle_root": str(bundle)}
    if workflow_type == "train":
        override.update({k: v for k, v in (("num_workers", 0), ("cache_rate", 0.0)) if k in content})
    try:
        workflow = ConfigWorkflow(config_file=str(config), meta_file=str(bundle / "configs" / "metadata.json"),
                                  logging_file=False, workflow_type=workflow_type, **override)
        workflow.initialize()
        missing = workflow.check_properties()
    except Exception as err:
        return [f"{config}: {workflow_type} workflow does not initialize or resolve ({_first_line(err)})"]
    return [f"{config}: {workflow_type} workflow lacks properties {sorted(missing)} (check_properties)"] if missing else []


_ONNX_SCRIPT = """
import sys, onnxruntime
from monai.bundle import onnx_export
target, ckpt, config, meta, root = sys.argv[1:]
onnx_export(net_id="network_def", filepath=target, ckpt_file=ckpt, config_file=config, meta_file=meta, bundle_root=root)
onnxruntime.InferenceSession(target, providers=["CPUExecutionProvider"])
print("EXPORTED_AND_LOADED")
"""


def check_onnx_export(bundle: Path, timeout: float = 600) -> list[str]:
    """MONAI's ``onnx_export`` of ``models/model.pt`` into a temporary folder, then an ONNX Runtime session on it."""
    config, ckpt = infer_config(bundle), bundle / "models" / "model.pt"
    if config is None or not ckpt.is_file():
        return [f"{bundle}: onnx_export needs configs/inference.json and models/model.pt"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _ONNX_SCRIPT, str(Path(tmp, "verify_model.onnx")), str(ckpt), str(config),
               str(bundle / "configs" / "metadata.json"), str(bundle)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [f"{ckpt}: onnx_export did not finish in {timeout:.0f} s"]
    if proc.returncode == 0 and "EXPORTED_AND_LOADED" in proc.stdout:
        return []
    return [f"{ckpt}: onnx_export failed ({_last_error(proc.stdout + proc.stderr, proc.returncode)})"]


def check_net_in_out(bundle: Path, device: str = "cpu") -> list[str]:
    """The model zoo's ``verify_data_shape``: MONAI's ``verify_net_in_out`` on ``network_def`` of the inference
    config (output channels and dtype), then a forward pass at n=p=1 and n=p=2 comparing the output's spatial shape
    with ``outputs.pred.spatial_shape`` (a (batch, channels) output matches an all-ones spatial shape)."""
    from monai.bundle import verify_net_in_out

    config, meta_file = infer_config(bundle), bundle / "configs" / "metadata.json"
    if config is None:
        return [f"{bundle}: no inference config"]
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(config),
                          device=device, bundle_root=str(bundle))
    except Exception as err:
        return [f"{config}: verify_net_in_out failed ({_first_line(err)})"]
    meta, problems = _load_metadata(bundle)
    if meta is None:
        return problems
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(bundle)
    try:
        net = parser.get_parsed_content("network_def").to(device).eval()
        for n, p in ((1, 1), (2, 2)):
            shape = (1, image["num_channels"], *spatial_dims(image["spatial_shape"], n=n, p=p))
            with torch.no_grad():
                out = net(torch.rand(*shape, dtype=get_equivalent_dtype(image["dtype"], torch.Tensor), device=device))
            if not isinstance(out, torch.Tensor):
                problems.append(f"{config}: network_def returns {type(out).__name__}, not a tensor, for input {shape}")
                break
            expected = spatial_dims(pred["spatial_shape"], n=n, p=p)
            got = tuple(out.shape[2:])
            if got != expected and not (got == () and set(expected) <= {1}):
                problems.append(f"{config}: input {shape} gives output spatial shape {got}, "
                                f"metadata outputs.pred.spatial_shape {pred['spatial_shape']} says {expected} at n={n}, p={p}")
    except Exception as err:
        problems.append(f"{config}: forward pass failed ({_first_line(err)})")
    return problems


_EXPORT_SCRIPT = """
import sys, torch
from monai.bundle import ckpt_export
target, ckpt, config, meta, root, shipped = sys.argv[1:]
ckpt_export(net_id="network_def", filepath=target, ckpt_file=ckpt, config_file=config, meta_file=meta, bundle_root=root)
torch.jit.load(target)
print("EXPORTED_AND_LOADED")
if shipped:
    torch.jit.load(shipped)
    print("SHIPPED_LOADED")
"""


def check_ckpt_export(bundle: Path, timeout: float = 600) -> list[str]:
    """The model zoo's ``verify_torchscript``: ``ckpt_export`` of ``models/model.pt`` (into a temporary folder, not
    the bundle) and ``torch.jit.load`` of the result and of ``models/model.ts`` when the bundle ships one. Runs in a
    subprocess, as the model zoo runs each bundle in its own process: TorchScript keeps every class it compiled, so
    a second bundle scripting the same encoder class in one process fails for that reason alone."""
    config, ckpt = infer_config(bundle), bundle / "models" / "model.pt"
    if config is None or not ckpt.is_file():
        return [f"{bundle}: ckpt_export needs configs/inference.json and models/model.pt"]
    shipped = bundle / "models" / "model.ts"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", _EXPORT_SCRIPT, str(Path(tmp, "verify_model.ts")), str(ckpt), str(config),
               str(bundle / "configs" / "metadata.json"), str(bundle), str(shipped) if shipped.is_file() else ""]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [f"{ckpt}: ckpt_export did not finish in {timeout:.0f} s"]
    if proc.returncode == 0:
        return []
    where = shipped if "EXPORTED_AND_LOADED" in proc.stdout else ckpt
    what = "torch.jit.load failed" if where == shipped else "ckpt_export to TorchScript failed"
    return [f"{where}: {what} ({_last_error(proc.stdout + proc.stderr, proc.returncode)})"]


def _last_error(output: str, returncode: int) -> str:
    """The last ``SomeError: message`` line of a subprocess's traceback (or its last line)."""
    lines = output.splitlines()
    found = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception):( |$)", line)]
    if not found:
        return ((output.strip().splitlines() or [f"exit status {returncode}"])[-1])[:400]
    text = lines[found[-1]].strip()
    if text.endswith(":"):  # e.g. TorchScript's "RuntimeError: \nUnknown type name 'dict':\n  File ..."
        text += " " + " ".join(line.strip() for line in lines[found[-1] + 1:] if line.strip())[:300]
    return text[:400]


def monai_verify_metadata(bundle: str | Path, timeout: float = 300) -> list[str]:
    """``python -m monai.bundle verify_metadata --meta_file <bundle>/configs/metadata.json --filepath
    ci/<schema> --hash_val <sha256> --hash_type sha256`` in a subprocess: MONAI's own check, offline. MONAI's
    ``download_url`` skips the download when ``filepath`` exists and its hash matches (and raises, still without
    downloading, when it does not); the subprocess also gets a proxy that refuses connections, so it cannot reach
    the network whatever happens. Returns the problems (empty when MONAI accepts the metadata)."""
    bundle = Path(bundle)
    meta_file = bundle / "configs" / "metadata.json"
    meta, problems = _load_metadata(bundle)
    if meta is None:
        return problems
    schema_path, problems = local_schema(meta, meta_file)
    if schema_path is None:
        return problems
    hash_val = SCHEMAS[schema_path.name]
    try:  # python-fire would turn a digest that reads as a number (e.g. "12e3...") into one
        ast.literal_eval(hash_val)
        hash_arg = json.dumps(hash_val)
    except (ValueError, SyntaxError):
        hash_arg = hash_val
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
           "--filepath", str(schema_path), "--hash_val", hash_arg, "--hash_type", "sha256"]
    env = dict(os.environ, http_proxy=_NO_NETWORK, https_proxy=_NO_NETWORK, HTTP_PROXY=_NO_NETWORK,
               HTTPS_PROXY=_NO_NETWORK, no_proxy="", NO_PROXY="")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [f"{meta_file}: monai.bundle verify_metadata did not finish in {timeout:.0f} s"]
    output = proc.stdout + proc.stderr
    if proc.returncode == 0 and "metadata is verified with no error" in output:
        return []
    return [f"{meta_file}: monai.bundle verify_metadata failed: {_last_error(output, proc.returncode)}"]


FULL_CHECKS = (check_property_ids, check_properties, check_net_in_out, check_ckpt_export, check_onnx_export, monai_verify_metadata)


# ---------------------------------------------------------------- entry points


def verify(bundle: str | Path, full: bool = False, monai: bool = False, released: set[str] = frozenset()) -> list[str]:
    """Every problem found in one bundle, one line each (empty when the bundle is fine).

    ``full`` adds the slower checks (``FULL_CHECKS``: workflow properties, network in/out, TorchScript and ONNX
    export, MONAI's verify_metadata; about a minute per bundle); ``monai`` adds only ``monai_verify_metadata``; ``released``
    holds ``<bundle>_v<version>`` names already published (a model zoo's model_info.json keys)."""
    bundle = Path(bundle)
    problems = check_files(bundle) + check_symlinks(bundle)
    if (bundle / "configs" / "metadata.json").is_file():
        problems += check_metadata(bundle) + check_version_not_released(bundle, set(released))
    if (bundle / "configs").is_dir():
        problems += check_logging_conf(bundle)
        for config in config_files(bundle):
            problems += check_config(bundle, config)
    problems += check_large_files(bundle)
    if (bundle / "configs" / "metadata.json").is_file():
        if full:
            for check in FULL_CHECKS:
                problems += check(bundle)
        elif monai:
            problems += monai_verify_metadata(bundle)
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="bundle folders (default: every folder in bundles/)")
    parser.add_argument("--full", action="store_true", help="also the slower checks (what make test runs): "
                        "check_property_ids, check_properties, check_net_in_out, check_ckpt_export, check_onnx_export, "
                        "monai_verify_metadata")
    parser.add_argument("--monai", action="store_true", help="also MONAI's own verify_metadata (offline subprocess)")
    parser.add_argument("--model-info", type=Path, help="a model zoo's models/model_info.json: refuse released versions")
    args = parser.parse_args(argv)
    bundles = args.bundles or sorted(str(p) for p in Path("bundles").iterdir() if p.is_dir())
    released = released_versions(args.model_info)
    problems = [p for b in bundles for p in verify(b, full=args.full, monai=args.monai, released=released)]
    for line in problems:
        print(line, file=sys.stderr)
    print(f"verified {len(bundles)} bundle(s){' (full)' if args.full else ''}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
