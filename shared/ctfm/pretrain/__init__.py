"""The ``ctfm_pretrain`` bundle's code: one module per pre-training recipe, and the data they read.

- :mod:`~ctfm.pretrain.simclr` -- CT-FM's intra-sample SimCLR: views, batch preparation, NT-Xent loss;
- :mod:`~ctfm.pretrain.idc_manifest` -- the Imaging Data Commons series list CT-FM pre-trained on.

The networks are in :mod:`ctfm.networks` (:class:`~ctfm.networks.ContrastiveModel`).
"""

__all__ = ["idc_manifest", "simclr"]
