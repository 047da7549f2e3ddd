"""``python -m ctfm.retrieval``: index a store, search it, describe an index.

    python -m ctfm.retrieval index STORE_FOLDER INDEX_DIR [--metric cosine|euclidean] [--kind auto|flat|hnsw] [--level scan|patch]
    python -m ctfm.retrieval query INDEX_DIR --store STORE_FOLDER --id ID [--k 5] [--out DIR]
    python -m ctfm.retrieval query INDEX_DIR --bundle BUNDLE --image CT [--box X0 Y0 Z0 X1 Y1 Z1 | --mask MASK [--label N]]
                                   [--k 5] [--out DIR] [--set ID=VALUE ...]
    python -m ctfm.retrieval info INDEX_DIR

``STORE_FOLDER`` is ``<store_dir>/<fingerprint>`` as ``extract.json`` writes it. A query by a CT embeds it with the
bundle's ``extract.json`` recipe and encoder (it runs ``extract.json`` + ``query.json`` of ``BUNDLE``, with the
``--set`` overrides the store was extracted with: another recipe is another store, and the index refuses it). Hits go
to ``--out`` (default: the current folder) as ``<name>_hits.csv`` and ``<name>_hits.png``; the CSV is also printed.
Errors end the command with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ctfm.errors import CTFMError, install_excepthook

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ctfm.retrieval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="index a merged embedding store")
    p.add_argument("store")
    p.add_argument("index_dir")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw"])
    p.add_argument("--level", default="scan", choices=["scan", "patch"])
    q = sub.add_parser("query", help="search an index by a stored id, a CT or a region of a CT")
    q.add_argument("index_dir")
    q.add_argument("--store", help="the store folder (query by --id)")
    q.add_argument("--id", dest="query_id")
    q.add_argument("--bundle", help="the ctfm_retrieval bundle whose recipe embeds --image")
    q.add_argument("--image")
    q.add_argument("--box", nargs=6, type=float, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"), help="region in RAS mm")
    q.add_argument("--mask")
    q.add_argument("--label", type=int)
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--out", default=".")
    q.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE",
                   help="overrides of the bundle's config ids, as extract.json was run with (e.g. overlap=0.0)")
    i = sub.add_parser("info", help="describe an index")
    i.add_argument("index_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    install_excepthook()
    args = _parser().parse_args(argv)
    from ctfm.embedding_store import EmbeddingStore
    from ctfm.retrieval.index import RetrievalIndex, index_store

    if args.command == "index":
        print(index_store(EmbeddingStore.open(args.store), args.index_dir, args.metric, args.kind, args.level).summary())
        return 0
    if args.command == "info":
        print(RetrievalIndex(args.index_dir).info.summary())
        return 0
    if args.query_id is not None:
        if args.store is None or args.image is not None:
            raise CTFMError("query --id needs --store (the store folder) and no --image")
        from ctfm.retrieval.query import run_query

        hits = run_query(args.index_dir, args.out, None, None, None, "min", EmbeddingStore.open(args.store), query_id=args.query_id, k=args.k)
    else:
        if args.bundle is None or args.image is None:
            raise CTFMError("query needs --id with --store, or --image with --bundle")
        hits = _bundle_query(args)
    print(hits.to_csv(index=False), end="")
    return 0


def _value(text: str):
    """A ``--set`` value: JSON where it parses (numbers, lists, true / null), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _bundle_query(args):
    from monai.bundle import ConfigWorkflow

    configs = [str(Path(args.bundle) / "configs" / name) for name in ("extract.json", "query.json")]
    overrides = {k: _value(v) for k, _, v in (item.partition("=") for item in args.set)}
    overrides |= {"bundle_root": str(Path(args.bundle).resolve()), "query_image": args.image, "query_box_mm": args.box, "query_mask": args.mask, "query_label": args.label, "k": args.k}
    workflow = ConfigWorkflow(config_file=configs, workflow_type="infer", logging_file=False, **overrides)
    workflow.initialize()
    from ctfm.retrieval.query import run_query

    p = workflow.parser.get_parsed_content
    return run_query(args.index_dir, args.out, p("network"), p("preprocessing"), p("inferer"), p("pooling"), p("store"),
                     query_image=args.image, query_box_mm=args.box, query_mask=args.mask, query_label=args.label, k=args.k,
                     device=p("device"))


if __name__ == "__main__":
    sys.exit(main())
