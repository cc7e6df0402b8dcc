"""`models`: every open_clip architecture and pretrained tag, supported or refused with the reason.

    python -m etl models [--json] [--supported | --refused]

Supported means CLIP Atlas decomposes the image tower exactly (models/towers: open_clip's own
ViT with class-token, average or attentional pooling; timm's VisionTransformer and Eva with class
token, average or MAP pooling). Refused towers are named with why (convolutional towers have no
attention heads). The toy zoo's architectures are listed too (no pretrained tags; shipped weights).
"""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list every open_clip architecture and pretrained tag, supported or refused",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (counts and one entry per architecture) instead of a table")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--supported", action="store_true", help="list only the supported architectures")
    which.add_argument("--refused", action="store_true", help="list only the refused architectures")
    p.set_defaults(func=run)


def list_models(supported: bool = False, refused: bool = False) -> dict:
    """{"counts": {...}, "architectures": [...]} (models.registry.catalogue), filtered; the counts
    are over every architecture whatever the filter."""
    from models.registry import catalogue
    rows = catalogue()
    counts = dict(architectures=len(rows), architectures_supported=sum(r["supported"] for r in rows),
                  pretrained_tags=sum(len(r["tags"]) for r in rows),
                  pretrained_tags_supported=sum(len(r["tags"]) for r in rows if r["supported"]))
    if supported or refused:
        rows = [r for r in rows if r["supported"] == supported]
    return {"counts": counts, "architectures": rows}


def run(args) -> int:
    out = list_models(args.supported, args.refused)
    if args.json:
        print(json.dumps(out))
        return 0
    width = max((len(r["arch"]) for r in out["architectures"]), default=10)
    for r in out["architectures"]:
        tags = ", ".join(r["tags"]) or "-"
        status = "supported" if r["supported"] else f"refused: {r['reason']}"
        print(f"{r['arch']:<{width}}  {status}\n{'':<{width}}  tower: {r['tower']}; pretrained: {tags}")
    c = out["counts"]
    print(f"\n{c['architectures_supported']} of {c['architectures']} architectures and "
          f"{c['pretrained_tags_supported']} of {c['pretrained_tags']} pretrained tags are supported.")
    return 0
