"""CT foundation-model zoo: the shared CT-FM encoder, CT input, preprocessing and export used by every bundle.

Where things are:

- :mod:`ctfm.encoder` -- the one encoder definition (MONAI ``SegResEncoder`` with CT-FM's arguments).
- :mod:`ctfm.checkpoint` -- loading every published CT-FM weight layout; saving HF folders and state dicts.
- :mod:`ctfm.ct_io` -- reading NIfTI / NRRD / DICOM series with one-line errors for bad input.
- :mod:`ctfm.transforms` -- CT-FM preprocessing as MONAI transforms.
- :mod:`ctfm.export` -- ONNX / ONNX Runtime / TensorRT.
- :mod:`ctfm.augment` -- segmentation training augmentations (contrast phases, short series).
"""

from ctfm.errors import CTFMError, install_excepthook

__version__ = "0.1.0"

install_excepthook()

__all__ = ["CTFMError", "__version__"]
