"""Does a bundle's ``metadata.json`` name every package its code imports? A static check, no network.

    python ci/check_packages.py [bundles/NAME ...]

The model zoo's CI pip-installs ``monai``, ``torch``, ``numpy`` and the ``required_packages_version`` pins
(``ci/get_bundle_requirements.py``); a package missing there fails on a user's fresh machine, not on ours, where
everything is installed. So the check reads what the bundle's code can import:

1. the entry points: every ``$import`` of the bundle's configs and every ``ctfm.<module>`` they name;
2. from there, every module of the ``ctfm`` package reachable by ``import`` statements (parsed with ``ast``, not
   imported), telling a module-level import (needed whenever the module loads) from one inside a function
   (needed only on the path that calls it, e.g. ONNX Runtime for ``inference_onnx.json``);
3. each third-party module's distribution (``importlib.metadata.packages_distributions``; a module not installed
   here is taken by its own name, ``cuda`` as ``cuda-python``; another build of a declared package, such as
   ``onnxruntime`` for ``onnxruntime-gpu``, counts as it), plus the packages that MONAI components named in the
   configs need (``TensorBoardStatsHandler``: tensorboard).

A distribution counts as declared when it is ``monai``/``torch``/``numpy``, a key of ``required_packages_version``
or a requirement (recursively) of one of those other than ``ctfm`` itself: ``ctfm``'s own dependencies must be
listed, since the metadata is what the zoo installs from. Every module-level import must be declared there; a
function-level one there or in ``optional_packages`` (``{config or feature: {distribution: version}}``).

Why ``optional_packages`` and not ``optional_packages_version``: MONAI 1.6.1 treats ``optional_packages_version``
as the deprecated name of ``required_packages_version`` (``monai.bundle.utils.DEPRECATED_ID_MAPPING``): reading
the metadata, its parser moves it onto ``required_packages_version``, replacing the real list, and the model zoo's
``get_bundle_requirements.py`` pip-installs both, so TensorRT would be forced onto every CPU machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from functools import cache
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from ctfm.registry.index import normalise_project

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shared" / "ctfm"
#: Modules whose distribution has another name and which may not be installed here.
KNOWN_DISTRIBUTIONS = {"cuda": "cuda-python", "tensorrt": "tensorrt", "polygraphy": "polygraphy"}
ALWAYS = {"monai", "torch", "numpy"}
#: Builds that provide the same modules: any one of a group installed here stands for the one declared.
ALTERNATIVES = [{"onnxruntime-gpu", "onnxruntime", "onnxruntime-openvino"}, {"faiss-cpu", "faiss-gpu"}]
#: Third-party packages the configs reach through MONAI components rather than ``import`` statements.
COMPONENTS = {"TensorBoardStatsHandler": "tensorboard", "MLFlowHandler": "mlflow", "ITKReader": "itk",
              "NibabelReader": "nibabel", "ProgressBar": "pytorch-ignite"}

__all__ = ["check_packages", "imported_distributions"]


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "ctfm":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """``(module, at_module_level)`` for every import in the file ``path`` (of ``module``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                found.append((base, top))
                found.extend((f"{base}.{alias.name}", top) for alias in child.names)  # a submodule, if it is one
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
                nested = False  # runs as ``python -m``, not on import
            visit(child, nested)

    visit(tree, True)
    return found


def _entry_points(bundle: Path) -> tuple[dict[str, bool], set[str]]:
    """``({ctfm module: loaded by every run}, third-party top-level modules)`` that the bundle's configs import or
    name; a module only its ``metadata.json`` names (a command such as ``python -m ctfm.pretrain.idc_manifest``)
    is not loaded by every run."""
    ctfm_modules, others = {"ctfm": True}, set()
    for config in sorted((bundle / "configs").glob("*.json")):
        text = config.read_text()
        data = json.loads(text)
        if config.name != "metadata.json":
            others |= {module for component, module in COMPONENTS.items() if f'"{component}"' in text}
        for line in data.get("imports", []) if isinstance(data, dict) else []:
            match = re.match(r"\$\s*(?:import|from)\s+([\w.]+)", str(line))
            if match and not match.group(1).startswith("ctfm"):
                others.add(match.group(1).split(".")[0])
        for dotted in re.findall(r"\bctfm(?:\.\w+)+", text):
            parts = dotted.split(".")
            for n in range(len(parts), 0, -1):
                module = ".".join(parts[:n])
                if _module_file(module) is not None:
                    ctfm_modules[module] = ctfm_modules.get(module, False) or config.name != "metadata.json"
                    break
    return ctfm_modules, others - set(sys.stdlib_module_names)


@cache
def _distributions_of() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution(module: str) -> str:
    names = [normalise_project(n) for n in _distributions_of().get(module, [])]
    if normalise_project(module) in names:  # e.g. "itk", which every itk-* distribution also provides
        return normalise_project(module)
    return sorted(names)[0] if names else normalise_project(KNOWN_DISTRIBUTIONS.get(module, module))


def imported_distributions(bundle: Path) -> tuple[set[str], set[str]]:
    """``(needed whenever the code loads, needed on some path only)``: distributions, PEP 503-normalised."""
    top_level, third = _entry_points(bundle)  # entry modules load when the config is parsed
    todo = sorted(top_level)
    external: dict[str, bool] = {m: True for m in third}
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if path is None:
            continue
        for name, at_top in _imports(path, module):
            loaded = top_level[module] and at_top
            root = name.split(".")[0]
            if root == "ctfm":
                if _module_file(name) is None:
                    continue
                if name not in top_level or (loaded and not top_level[name]):
                    top_level[name] = top_level.get(name, False) or loaded
                    todo.append(name)
            elif root and root not in sys.stdlib_module_names and root != "__future__":
                external[root] = external.get(root, False) or loaded
    always = {_distribution(m) for m, t in external.items() if t}
    sometimes = {_distribution(m) for m, t in external.items() if not t} - always
    return always - {"ctfm"}, sometimes - {"ctfm"}


def _requirements_closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (installed metadata, extras not followed), normalised."""
    seen, todo = set(), [normalise_project(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "ctfm":
            continue  # its dependencies must be declared by the bundle itself
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(normalise_project(req.name))
    return seen


def check_packages(bundle: str | Path) -> list[str]:
    """One line per distribution the bundle's code imports that its ``metadata.json`` does not declare."""
    bundle = Path(bundle)
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    required = set((meta.get("required_packages_version") or {})) | ALWAYS
    optional = {name for group in (meta.get("optional_packages") or {}).values() for name in group}
    declared = _requirements_closure(required)
    declared_any = declared | _requirements_closure(optional)
    always, sometimes = imported_distributions(bundle)

    def missing(found: set[str], among: set[str]) -> list[str]:
        return sorted(d for d in found if not ({d} | next((g for g in ALTERNATIVES if d in g), set())) & among)

    problems = [f"{path}: required_packages_version lacks {d}, which the bundle's code imports at load time"
                for d in missing(always, declared)]
    problems += [f"{path}: neither required_packages_version nor optional_packages names {d}, which the bundle's "
                 f"code can import" for d in missing(sometimes, declared_any)]
    return problems


def main(argv: list[str]) -> int:
    bundles = [Path(a) for a in argv] or sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
    problems = [p for b in bundles for p in check_packages(b)]
    for line in problems:
        print(line, file=sys.stderr)
    print(f"checked {len(bundles)} bundle(s): {len(problems)} undeclared package(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
