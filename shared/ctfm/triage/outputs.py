"""What triage inference writes per CT: probabilities as JSON, one CSV row per CT of the run, a saliency PNG.

For an input ``<stem>`` (its path relative to ``dataset_dir`` without extension, :func:`ctfm.datalist.output_stem`):

- ``<output_dir>/<stem>_triage.json``: ``{"source", "findings": {name: probability}, "saliency_finding"}``;
- ``<output_dir>/<stem>_saliency.png``: Grad-CAM of the most probable finding, three planes through its maximum,
  over the brain window;
- ``<output_dir>/triage.csv``: ``source`` then one probability column per finding, one row per CT of this run,
  rewritten after each CT.

Every file is written atomically; an output made from another input is never replaced (:class:`OutputGuard`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from ctfm.datalist import OutputGuard, output_stem
from ctfm.errors import CTFMError
from ctfm.files import atomic_path
from ctfm.preview import render_saliency
from ctfm.triage.saliency import fold_windows, gradcam

__all__ = ["WriteTriaged"]


class WriteTriaged(MapTransform):
    """Write the outputs of one CT from ``pred`` ``(F,)`` probabilities and the preprocessed ``image``.

    Args:
        findings: names of the ``F`` probabilities.
        output_dir: where the outputs go.
        data_root_dir: the folder inputs are named relative to (the bundle's ``dataset_dir``).
        saliency_network: the torch network Grad-CAM runs on (the inference network may be ONNX Runtime), or
            ``None`` for no saliency PNG.
        window_stack: how the recipe stacked its HU windows (``"S"`` or ``"channel"``), and ``n_windows`` how many.
    """

    def __init__(
        self,
        keys: str = "pred",
        findings: Sequence[str] = (),
        output_dir: str | os.PathLike = "eval",
        data_root_dir: str | os.PathLike | None = None,
        saliency_network: nn.Module | None = None,
        window_stack: str = "S",
        n_windows: int = 4,
        image_key: str = "image",
    ):
        super().__init__(keys)
        self.findings = list(findings)
        self.output_dir = Path(output_dir)
        self.data_root_dir = data_root_dir
        self.saliency_network = saliency_network
        self.window_stack = window_stack
        self.n_windows = int(n_windows)
        self.image_key = image_key
        self.rows: dict[str, dict] = {}
        self._guard = OutputGuard(_recorded_source)

    def outputs_for(self, source: str | os.PathLike) -> dict[str, Path]:
        stem = self.output_dir / output_stem(source, self.data_root_dir)
        return {"json": stem.with_name(stem.name + "_triage.json"), "png": stem.with_name(stem.name + "_saliency.png")}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = _source(pred, d.get(self.image_key))
            probabilities = torch.as_tensor(pred).detach().float().cpu().reshape(-1).tolist()
            if len(probabilities) != len(self.findings):
                raise CTFMError(f"{source}: {len(probabilities)} probabilities for {len(self.findings)} findings {self.findings}")
            outputs = self.outputs_for(source)
            self._guard.check(source, outputs["json"])
            top = int(np.argmax(probabilities))
            record = {
                "source": str(Path(source).resolve()),
                "findings": dict(zip(self.findings, (round(p, 6) for p in probabilities))),
                "saliency_finding": self.findings[top] if self.saliency_network is not None else None,
            }
            try:
                if self.saliency_network is not None:  # first: the JSON is the record that the CT is done
                    self._write_saliency(d[self.image_key], top, source, outputs["png"])
                with atomic_path(outputs["json"]) as tmp:
                    tmp.write_text(json.dumps(record, indent=2) + "\n")
                self.rows[record["source"]] = record
                self._write_table()
            except OSError as err:
                raise CTFMError(f"{err.filename or self.output_dir}: cannot write outputs ({err.strerror})") from None
            self._guard.done(source, outputs["json"])
        return d

    def _write_saliency(self, image: torch.Tensor, finding: int, source: str, path: Path) -> None:
        heat = gradcam(self.saliency_network, image, finding)
        volume = torch.as_tensor(image).detach().cpu().numpy()
        if self.window_stack == "S":
            heat, brain = fold_windows(heat, self.n_windows), volume[0][: volume.shape[1] // self.n_windows]
        else:
            brain = volume[0]
        heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
        affine = np.asarray(image.affine) if hasattr(image, "affine") else np.eye(4)
        title = f"{Path(source).name}: {self.findings[finding]}"
        render_saliency(brain, heat, affine, path, title=title)

    def _write_table(self) -> None:
        with atomic_path(self.output_dir / "triage.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", *self.findings])
            for source, record in sorted(self.rows.items()):
                writer.writerow([source, *(record["findings"][name] for name in self.findings)])


def _source(*tensors) -> str:
    """The input file of a prediction: ``filename_or_obj`` of its own metadata, else of the image's (an ONNX
    Runtime or TensorRT network returns a plain tensor)."""
    for tensor in tensors:
        source = getattr(tensor, "meta", {}).get("filename_or_obj")
        source = source[0] if isinstance(source, (list, tuple)) else source
        if source:
            return str(source)
    raise CTFMError("triage output: neither the prediction nor the image says which file it came from (no filename_or_obj)")


def _recorded_source(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
