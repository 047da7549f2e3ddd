"""The ``ctfm_segmentation`` bundle's code, one idea per module:

- :mod:`~ctfm.segmentation.data` -- training data layouts (TotalSegmentator subject folders, NIfTI datalists,
  MSD ``dataset.json``), label alignment and remapping;
- :mod:`~ctfm.segmentation.augment` -- training augmentations MONAI lacks (contrast phases, short series);
- :mod:`~ctfm.segmentation.inferer` -- sliding-window inference straight to a label map, memory bounded;
- :mod:`~ctfm.segmentation.outputs` -- label maps back on the input grid; NIfTI / PNG / DICOM SEG writer;
- :mod:`~ctfm.segmentation.dicom_seg` -- DICOM SEG encoding with TotalSegmentator's codes;
- :mod:`~ctfm.segmentation.evaluation` -- Dice, surface distance, confusion counts, reports.

The network is :class:`ctfm.networks.CTFMSegResNetDS`.
"""

__all__ = ["augment", "data", "dicom_seg", "evaluation", "inferer", "outputs"]
