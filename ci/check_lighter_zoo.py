"""Round trip between CT-FM's own ``lighter-zoo`` package and ``ctfm``: folders either writes, the other loads.

    python ci/check_lighter_zoo.py        # installs lighter-zoo into .venv-lighter-zoo/ (PyPI, seconds), runs the checks

lighter-zoo 0.1.3 is how CT-FM publishes its weights (``SegResEncoder`` / ``SegResNet`` = MONAI's
``SegResEncoder`` / ``SegResNetDS`` with huggingface_hub's ``PyTorchModelHubMixin``). It requires jupyter, which
the test environment has no use for, so it is installed without its dependencies into a folder of its own
(``pip install --target``) that only this check puts on ``sys.path``; what it needs besides (monai, torch,
huggingface_hub, safetensors) is the test environment's. With tiny widths and random weights:

1. ``lighter_zoo.SegResEncoder.save_pretrained`` -> ``ctfm.checkpoint.load_encoder`` (the ``ct_fm_feature_extractor``
   layout): same embedding;
2. ``lighter_zoo.SegResNet.save_pretrained`` (the ``whole_body_segmentation`` layout) -> ``ctfm.weights.load`` into
   :class:`~ctfm.networks.CTFMSegResNetDS` (same logits) and ``ctfm.weights.init_encoder`` (same encoder);
3. ``ctfm.checkpoint.save_hf_folder`` of a ``CTFMSegResNetDS`` and of a ``CTFMEncoder`` ->
   ``lighter_zoo.SegResNet.from_pretrained`` / ``SegResEncoder.from_pretrained``: same outputs.

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lighter-zoo"
LIGHTER_ZOO = "lighter-zoo==0.1.3"

CHECKS = r'''
import sys, tempfile, torch
from pathlib import Path
from lighter_zoo import SegResEncoder, SegResNet
from ctfm.checkpoint import load_encoder, save_hf_folder
from ctfm.networks import CTFMEncoder, CTFMSegResNetDS
from ctfm.weights import init_encoder, load

def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var") else torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()

x = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
failed = 0
def report(name, ok):
    global failed
    failed += not ok
    print(("ok    " if ok else "FAILED ") + name, flush=True)

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    theirs = randomise(SegResEncoder(spatial_dims=3, in_channels=1, init_filters=4, blocks_down=(1, 2, 2, 4, 4)), 0)
    theirs.save_pretrained(tmp / "encoder")
    ours, report_ = load_encoder(tmp / "encoder")
    report("lighter-zoo SegResEncoder folder -> ctfm load_encoder", not report_.missing and torch.equal(ours.eval().embed(x), theirs(x)[-1].mean(dim=(2, 3, 4))))

    theirs = randomise(SegResNet(spatial_dims=3, in_channels=1, init_filters=4, blocks_down=(1, 2, 2, 4, 4), out_channels=5, dsdepth=4), 1)
    theirs.save_pretrained(tmp / "segmentation")
    ours = load(CTFMSegResNetDS(init_filters=4, out_channels=5, dsdepth=4), tmp / "segmentation").eval()
    report("lighter-zoo SegResNet folder -> ctfm.weights.load", torch.equal(ours(x), theirs(x)))
    encoder_only = init_encoder(CTFMSegResNetDS(init_filters=4, out_channels=3), tmp / "segmentation")
    report("lighter-zoo SegResNet folder -> ctfm.weights.init_encoder", all(torch.equal(v, theirs.encoder.state_dict()[k]) for k, v in encoder_only.encoder.state_dict().items()))

    ours = randomise(CTFMSegResNetDS(init_filters=4, out_channels=5, dsdepth=4), 2)
    save_hf_folder(ours, tmp / "ours_segmentation")
    theirs = SegResNet.from_pretrained(str(tmp / "ours_segmentation")).eval()
    report("ctfm save_hf_folder(CTFMSegResNetDS) -> lighter-zoo SegResNet.from_pretrained", torch.equal(theirs(x), ours(x)))
    ours = randomise(CTFMEncoder(init_filters=4), 3)
    save_hf_folder(ours, tmp / "ours_encoder")
    theirs = SegResEncoder.from_pretrained(str(tmp / "ours_encoder")).eval()
    report("ctfm save_hf_folder(CTFMEncoder) -> lighter-zoo SegResEncoder.from_pretrained", all(torch.equal(a, b) for a, b in zip(theirs(x), ours(x))))
sys.exit(1 if failed else 0)
'''


def main() -> int:
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "constraints.txt"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not (VENV / "lighter_zoo").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(VENV), LIGHTER_ZOO],
                       check=True, env=env)
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(CHECKS)
        script.flush()
        env = {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(VENV), env.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, script.name], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
