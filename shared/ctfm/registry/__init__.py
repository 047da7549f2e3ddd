"""The zoo's model registry: a static folder of verified bundle zips, an index and the ``ctfm`` wheel.

One module per part: :mod:`~ctfm.registry.archive` (reproducible zips; safe unpacking),
:mod:`~ctfm.registry.index` (``model_info.json`` and the PEP 503 pages; the registry's layout),
:mod:`~ctfm.registry.publish` (build or update a registry from the repository),
:mod:`~ctfm.registry.huggingface` (the Hugging Face model repo folder), :mod:`~ctfm.registry.client` (list,
download, verify). The command line, ``python -m ctfm.registry``::

    publish --out DIR [BUNDLE_FOLDER ...]                       all bundles when none is named
    list --registry URL_OR_DIR
    download NAME [--version V] --registry URL_OR_DIR --bundle_dir DIR
    verify --registry URL_OR_DIR

``--registry`` may be left out where ``$CTFM_REGISTRY`` names the registry; ``--bundle_dir`` defaults to
``monai.bundle download``'s folder (``<torch hub dir>/bundle``). Importing this package imports none of them.
"""

__all__: list[str] = []
