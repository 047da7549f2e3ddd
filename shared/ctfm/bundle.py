"""MONAI's bundle contract where MONAI leaves a gap: where the bundle is, and which command-line ids exist.

- :func:`bundle_root` -- the folder the running config was read from, so that a bundle copied anywhere uses
  its own weights and folders (``"bundle_root": "$ctfm.bundle.bundle_root()"``; ``--bundle_root`` and MONAI
  Label still override it).
- :func:`check_overrides` -- ``python -m monai.bundle run ... --dataset_dirr X`` silently adds an id no config
  reads; this stops such a run with one line naming the id.
- :func:`initialize` -- what every config's ``initialize`` calls first: the one-line error hook
  (:func:`ctfm.errors.install_excepthook`) and :func:`check_overrides`.

Both inspect the calling MONAI code (``ConfigWorkflow`` and ``monai.bundle.scripts``) through the call stack,
because MONAI does not hand a config its own file name or its command line.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

from ctfm.errors import CTFMError, install_excepthook

__all__ = ["RUN_ARGUMENTS", "bundle_root", "check_overrides", "config_ids", "initialize"]

#: Arguments of ``monai.bundle run`` / ``run_workflow`` that are not config ids.
RUN_ARGUMENTS = frozenset({
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_name", "workflow_type", "properties_path",
})
_SCRIPTS = os.path.join("monai", "bundle", "scripts.py")


def bundle_root() -> str:
    """The bundle folder of the config being parsed: the parent of its ``configs/`` folder.

    Found from the ``ConfigWorkflow`` that is parsing it (``python -m monai.bundle run``, ``monai.bundle.load``,
    ``ConfigWorkflow(...)`` in Python), else from the ``config_file`` of a ``monai.bundle`` command
    (``verify_net_in_out``, ``ckpt_export``, ``onnx_export``), else ``"."`` (the model zoo's convention: run
    from the bundle folder). Returns an absolute path except in that last case.
    """
    for frame in _frames():
        owner = frame.f_locals.get("self")
        root = getattr(owner, "__dict__", {}).get("config_root_path")  # not getattr: workflows answer it with properties
        if root is not None and type(owner).__name__.endswith("Workflow"):
            return str(_bundle_of(Path(root)))
        if frame.f_code.co_filename.endswith(_SCRIPTS):
            for name in ("config_file_", "config_file"):
                files = _as_files(frame.f_locals.get(name))
                if files:
                    return str(_bundle_of(Path(files[0]).parent))
    return "."


def config_ids(config: Mapping) -> set[str]:
    """Every id of a config dict, nested ones joined with ``#`` (``train#trainer#max_epochs``)."""
    ids: set[str] = set()

    def walk(node, prefix: str) -> None:
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            full = f"{prefix}#{key}" if prefix else str(key).replace("::", "#")
            ids.add(full)
            walk(value, full)

    walk(config, "")
    return ids


def check_overrides(overrides: Mapping[str, object] | None = None, config_file=None, tracking=None) -> None:
    """Refuse override ids that no config file of the run defines (one line naming them).

    An id is known when a config defines it, or when its parent is a component dict (``--network_def#foo``
    adds an argument, which the component then rejects by itself if it is wrong). Without arguments, the
    overrides and config files are those of the ``monai.bundle run`` in the call stack; outside such a run
    (``ConfigWorkflow`` in Python, MONAI Label) nothing is checked.

    A value whose kind differs from the config's literal default (``--roi_size abc`` where the config has a list)
    is refused too, naming the id, rather than failing deep inside MONAI.

    Raises:
        CTFMError: ``<config file>: no config defines --<id>`` for the unknown ids, or ``--<id> takes a <kind>``.
    """
    if overrides is None:
        found = _run_command()
        if found is None:
            return
        overrides, config_file, tracking = found
    files = _as_files(config_file)
    if not files:
        return
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(files)
    known = config_ids(config) | _tracking_ids(tracking)
    unknown = []
    for key in overrides:
        key = str(key)
        key = key.replace("::", "#")
        if key in RUN_ARGUMENTS or key.startswith("_meta_") or key in known:
            continue
        parent = key.rpartition("#")[0]
        if parent and parent in known and _is_component(config, parent):
            continue
        unknown.append(key)
    if unknown:
        listed = ", ".join(f"--{k}" for k in sorted(unknown))
        raise CTFMError(f"{files[-1]}: no config of this run defines {listed} (a misspelt id is otherwise ignored)")
    for key, value in overrides.items():
        key = str(key).replace("::", "#")
        default = _value_at(config, key)
        wanted, given = _kind(default), _kind(value)
        if wanted and given and wanted != given and not (isinstance(value, str) and value[:1] in "$@%"):
            raise CTFMError(f"{files[-1]}: --{key} takes a {wanted} such as {json.dumps(default)}, not {value!r}")


def _value_at(config: Mapping, config_id: str):
    node: object = config
    for part in config_id.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _kind(value) -> str | None:
    """What an override must look like given a config's literal default (``None``: anything goes)."""
    if value is None or (isinstance(value, str) and value[:1] in "$@%"):  # no literal default: an expression or reference
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return None  # a component: its own arguments are checked when it is built
    return "string"


def initialize() -> None:
    """Install the one-line error report and check the command line's ids (every config's ``initialize``)."""
    install_excepthook()
    check_overrides()


def _frames() -> Iterator[FrameType]:
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _run_command() -> tuple[dict, object] | None:
    """``(overrides, config_file, tracking)`` of the ``monai.bundle.scripts.run`` call in the stack, or ``None``."""
    for frame in _frames():
        if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith(_SCRIPTS):
            local = frame.f_locals
            overrides = dict(local.get("override") or {})
            config_file = local.get("config_file")
            if isinstance(local.get("args_file"), (str, os.PathLike)):
                from monai.bundle import ConfigParser

                from_file = ConfigParser.load_config_file(local["args_file"])
                config_file = config_file or from_file.get("config_file")
                overrides = {**{k: v for k, v in from_file.items() if k not in RUN_ARGUMENTS}, **overrides}
            return overrides, config_file, local.get("tracking")
    return None


def _tracking_ids(tracking) -> set[str]:
    """The top-level ids ``--tracking`` adds to a config (``tracking_uri``, ``experiment_name``, ...), which MONAI
    documents as overrides of the run."""
    if tracking is None:
        return set()
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else None
    if settings is None:
        settings = tracking if isinstance(tracking, dict) else ConfigParser.load_config_files(tracking)
    return {str(k) for k in (settings.get("configs") or {})}


def _as_files(value) -> list[str]:
    """Config files from what ``--config_file`` may be: a path, a list, ``"['a','b']"`` or ``"a,b"``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    if not Path(text).is_file() and "," in text:
        return [t.strip() for t in text.split(",") if t.strip()]
    return [text]


def _bundle_of(config_folder: Path) -> Path:
    config_folder = config_folder.resolve()
    return config_folder.parent if config_folder.name == "configs" else config_folder


def _is_component(config: Mapping, config_id: str) -> bool:
    node: object = config
    for part in config_id.split("#"):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, Mapping) and "_target_" in node

