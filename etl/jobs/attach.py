"""`attach`: register Parquet shard sets (written by `embed --engine ray`) in the warehouse.

Small sets are copied in; large ones stay where they are and `head_embeddings` becomes a view over
the table and the shard files (etl/shards.py attach_set; warehouse/writes.py
refresh_head_embeddings_view), so every page, view and SQL query reads them unchanged.

A set is untrusted input: it is checked whole, read-only and streaming, before the warehouse is
touched (etl/shards.py check_set, warehouse/shard_checks.py), and then written in one transaction.
"""
from __future__ import annotations

import json

from etl.common import add_warehouse_arg, non_negative_int, warehouse_path
from etl.shards import DEFAULT_COPY_BELOW
from warehouse.runs import run_record


def add_parser(sub) -> None:
    p = sub.add_parser("attach", help="register Parquet shards of `embed --engine ray` in the warehouse",
                       description="Read a shard set's manifest.json and check the set as untrusted input (every "
                                   "field of the manifest; every file the set's own, inside its folder, with its "
                                   "sha256, the warehouse's columns and types, vectors of the model's d, all finite; "
                                   "every key once, within the set and against the warehouse), then register it in "
                                   "one transaction (a failed attach changes nothing): images, factors and image "
                                   "embeddings are copied in; head embeddings "
                                   "too when the set has fewer than --copy-below rows, else they are read in place "
                                   "(head_embeddings becomes a view over the table and the shard files). "
                                   "Idempotent: attaching a set again adds no row.")
    p.add_argument("--shards", required=True, metavar="DIR",
                   help="a shard directory (it holds manifest.json), or a folder of them such as $ATLAS_HOME/shards "
                        "(every <model>/<dataset>/ below it)")
    add_warehouse_arg(p)
    p.add_argument("--copy-below", type=non_negative_int, default=DEFAULT_COPY_BELOW, metavar="ROWS",
                   help=f"copy head_embeddings in when a set has fewer rows than this, else read them in place "
                        f"(default {DEFAULT_COPY_BELOW:,}; 0 reads every set in place)")
    p.add_argument("--detach", action="store_true",
                   help="forget the set(s) instead: head_embeddings stops reading their files (rows copied into "
                        "the tables stay); for shards about to be deleted")
    p.set_defaults(func=run)


def attach(path: str, shards: str, copy_below: int = DEFAULT_COPY_BELOW) -> list[dict]:
    """Attach every shard set found at ``shards``; one run record and one result dict per set."""
    from etl.shards import attach_set, find_sets
    results = []
    for directory in find_sets(shards):
        with run_record(path, "attach", {"shard_dir": str(directory), "copy_below": int(copy_below)}) as run_id:
            result = attach_set(path, directory, copy_below, run_id)
            run_id.skipped = result["skipped"]
        results.append(result)
    return results


def detach(path: str, shards: str) -> list[dict]:
    """Forget the shard set at ``shards`` (the directory need not exist any more)."""
    from etl.shards import detach_set
    with run_record(path, "attach", {"shard_dir": shards, "detach": True}):
        return [detach_set(path, shards)]


def run(args) -> int:
    path = warehouse_path(args)
    results = detach(path, args.shards) if args.detach else attach(path, args.shards, args.copy_below)
    for result in results:
        print(json.dumps(result))
    return 0
