"""``ctfm_retrieval``'s code: embed CTs into a store, index it, search it, and probe what the embeddings know.

- :mod:`ctfm.retrieval.extract` -- a datalist of CTs to an :class:`~ctfm.embedding_store.EmbeddingStore` (scan and
  patch embeddings), resumable, sharded across torchrun ranks (``extract.json``).
- :mod:`ctfm.retrieval.index` -- faiss indexes of a store, exact or approximate by size (``index.json``).
- :mod:`ctfm.retrieval.query` -- search by a CT, a stored id or a region; hits as CSV and a contact sheet (``query.json``).
- :mod:`ctfm.retrieval.metrics` -- P@k, AP@k, mAP, recall@k, hit rate@k.
- :mod:`ctfm.retrieval.datasets` -- the 3D-MIR CSV layout and OrganMNIST3D's ``.npz`` (``evaluate.json``).
- :mod:`ctfm.retrieval.evaluation` -- retrieval metrics of the shipped and a random-init encoder on those.
- semantic probing (``probe.json``), one protocol per module: :mod:`~ctfm.retrieval.clustering`,
  :mod:`~ctfm.retrieval.semantic_search`, :mod:`~ctfm.retrieval.test_retest`, :mod:`~ctfm.retrieval.occlusion`;
  :mod:`ctfm.retrieval.probe` runs them for both encoders.
- ``python -m ctfm.retrieval index|query|evaluate`` -- the same, from the command line.
"""

__all__: list[str] = []
