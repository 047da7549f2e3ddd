"""CT foundation-model zoo: the shared CT-FM encoder and the code every bundle of ``bundles/`` runs.

Where things are (importing :mod:`ctfm` imports none of them and changes nothing in the host process):

Shared by every bundle
    - :mod:`ctfm.networks` -- the backbones (CT-FM's encoder, FM-CT's ViT), each defined once and built from its
      description, and every network built on them (no file I/O).
    - :mod:`ctfm.checkpoint` -- reading and writing every checkpoint layout (HF folders, Lightning, state dicts).
    - :mod:`ctfm.weights` -- the table of known weights (published CT-FM and shipped demo weights) and their hashes.
    - :mod:`ctfm.ct_io` -- reading and checking one CT (NIfTI / NRRD / MetaImage / DICOM series).
    - :mod:`ctfm.datalist` -- which CTs a run reads (``dataset_dir`` + ``datalist``) and how outputs are named.
    - :mod:`ctfm.transforms` -- CT-FM preprocessing as MONAI transforms.
    - :mod:`ctfm.embedding` -- the one embedding-extraction path (sliding patches, any encoder runtime).
    - :mod:`ctfm.embedding_store` -- the resumable per-scan embedding store (triage probe's cache, retrieval's store).
    - :mod:`ctfm.preview` -- every PNG the bundles write.
    - :mod:`ctfm.export` -- ONNX, ONNX Runtime, int8, TensorRT.
    - :mod:`ctfm.engine` -- crash-safe checkpoints, resume, distributed setup, progress, export handlers.
    - :mod:`ctfm.bundle` -- MONAI's bundle contract: ``bundle_root``, unknown-override check, one-line errors.
    - :mod:`ctfm.errors` -- the exception family whose message is one line naming the file.
    - :mod:`ctfm.download` -- the one bounded, hashed copy from a URL or path (weights, registry).
    - :mod:`ctfm.registry` -- the model registry: publish, list, download (verified), verify; reproducible zips.

One bundle each
    - :mod:`ctfm.pretrain` -- ``ctfm_pretrain``: one module per pre-training recipe.
    - :mod:`ctfm.segmentation` -- ``ctfm_segmentation``: data layouts, inferer, outputs, DICOM SEG, evaluation.
    - :mod:`ctfm.triage` -- ``ctfm_triage``: head-CT datasets, demo data, evaluation, probe, saliency, outputs.
    - :mod:`ctfm.retrieval` -- ``ctfm_retrieval``: extraction, faiss index, queries, retrieval metrics and
      benchmarks' readers, semantic probing (one module per protocol).

Axis convention, stated once: a volume read from disk is ``(X, Y, Z)`` in ITK's voxel order with a RAS affine
(:mod:`ctfm.ct_io`); every network sees ``(S, P, L)``: CT-FM's orientation code "SPL" in MONAI's classic letters
(axis 0 runs towards superior, 1 towards posterior, 2 towards the patient's left; see
:data:`ctfm.transforms.AXIS_LABELS`). Shapes in docstrings are ``(B, C, S, P, L)`` for network input.
"""

__version__ = "0.4.0"

__all__ = ["__version__"]
