"""The ``ctfm_triage`` bundle's code, one idea per module:

- :mod:`~ctfm.triage.datasets` -- CQ500, RSNA 2019, SinoCT-style and generic CSV labels as one case list;
  patient-level, stratified, seeded splits written to a file;
- :mod:`~ctfm.triage.demo` -- the demo data: head phantoms with synthetic bleeds, the real head CT with them;
- :mod:`~ctfm.triage.evaluation` -- per-finding AUROC / AP / F1 / sensitivity / specificity with bootstrap CIs,
  thresholds chosen on validation, ROC / PR / reliability PNGs, ``metadata.json`` ``eval_metrics``;
- :mod:`~ctfm.triage.probe` -- frozen-encoder linear probe, few-shot and label efficiency on cached embeddings;
- :mod:`~ctfm.triage.saliency` -- Grad-CAM on the recipe's grid;
- :mod:`~ctfm.triage.outputs` -- per-CT probabilities (JSON, CSV) and the saliency PNG.

The network is :class:`ctfm.networks.CTFMClassifier`; the recipes' transforms are :class:`ctfm.transforms.HeadCTGridd`
and :class:`ctfm.transforms.HUWindowsd`; the embedding cache is :mod:`ctfm.embedding_store`.
"""

__all__ = ["datasets", "demo", "evaluation", "outputs", "probe", "saliency"]
