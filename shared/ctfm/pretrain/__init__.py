"""The ``ctfm_pretrain`` bundle's code: one module per pre-training recipe, and the data they read.

- :mod:`~ctfm.pretrain.simclr` -- CT-FM's intra-sample SimCLR: views, batch preparation, NT-Xent loss;
- :mod:`~ctfm.pretrain.dino` -- FM-CT's DINO + masked image modelling: multi-crop views, masks, loss, teacher update;
- :mod:`~ctfm.pretrain.ema` -- moving averages and their schedules (the teacher that follows its student);
- :mod:`~ctfm.pretrain.idc_manifest` -- the Imaging Data Commons series list CT-FM pre-trained on.

The networks are in :mod:`ctfm.networks` (:class:`~ctfm.networks.ContrastiveModel`, :class:`~ctfm.networks.DINOModel`).
"""

__all__ = ["dino", "ema", "idc_manifest", "simclr"]
