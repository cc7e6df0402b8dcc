"""`decompose` (images -> .npz of per-head contributions) and `verify` (identity + ONNX parity)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from etl.common import add_model_args, load_model_from_args, non_negative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("decompose", help="decompose images into per-head contributions (.npz)",
                       description="Write the exact decomposition of MATH.md §1 for the given images to an .npz: "
                                   "embedding [B,d] (unit), head_cls [B,L',H,d], head_tokens [B,L',H,T,d] "
                                   "(T = prefix tokens + patches: index 0 the class token of a class-token ViT, none for SigLIP), "
                                   "rest [B,d], layers [L'] (0-based); "
                                   "with --second-order L also the second-order effects of MLP layer L's neurons.")
    add_model_args(p)
    p.add_argument("--image", action="append", required=True, metavar="FILE",
                   help="an image file (repeat the flag for several)")
    p.add_argument("--layers", default="last4", help="last4 (default), all, lastN, or 0-based indices like 8,9,10,11")
    p.add_argument("--no-tokens", action="store_true", help="skip head_tokens (smaller file)")
    p.add_argument("--second-order", type=non_negative_int, default=None, metavar="L",
                   help="also the second-order effects of MLP layer L's neurons (0-based; MATH.md §10): "
                        "second_order_alpha [B,N,K] (one scalar per neuron and later head), second_order_phi "
                        "[B,N,d] (each neuron's effect on the unit embedding, the scale of head_cls), "
                        "second_order_heads [K,2] (the later heads (layer, head) in alpha's order) and "
                        "second_order_layer")
    p.add_argument("--out", required=True, metavar="OUT.npz",
                   help="output file (.npz is appended when the name lacks it; the JSON line reports the path "
                        "written)")
    p.set_defaults(func=run_decompose)

    v = sub.add_parser("verify", help="check the decomposition identity and ONNX parity for a model",
                       description="On a few generated images: max |head_cls.sum(layers, heads) + rest - embedding| "
                                   "over all layers, and max |onnxruntime - torch| over every output. Prints one JSON "
                                   "line; exits 1 when identity > 1e-4 or parity > 1e-3.")
    add_model_args(v)
    v.add_argument("--n-images", type=positive_int, default=4, help="generated test images (default 4)")
    v.add_argument("--providers", default=None, choices=["cpu", "cuda"], help="onnxruntime provider (default: CUDA if usable, else CPU)")
    v.set_defaults(func=run_verify)


def preprocess_files(lm, files: list[str]) -> torch.Tensor:
    """Load image files (clear errors) and apply the model's eval transform -> [B, 3, S, S]."""
    import torch
    from models import load_image
    return torch.stack([lm.preprocess(load_image(f)) for f in files])


def npz_path(out: str) -> Path:
    """The file ``--out`` names, as numpy writes it (``.npz`` appended when missing); a ValueError
    for a folder."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; pass a file name, e.g. --out {path / 'decomposition.npz'}")
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    return path


def run_decompose(args) -> int:
    out = npz_path(args.out)          # before the model loads: a bad --out fails at once
    import numpy as np
    from models import decompose
    lm = load_model_from_args(args)
    L = args.second_order
    if L is not None and not 0 <= L < lm.layers - 1:
        raise ValueError(f"--second-order {L}: the effects run through later attention heads, so choose an MLP "
                         f"layer 0..{lm.layers - 2} of this {lm.layers}-layer model (0-based)")
    images = preprocess_files(lm, args.image)
    dec = decompose(lm, images, args.layers, tokens=not args.no_tokens)
    arrays = dec.numpy()
    arrays["layers"] = np.asarray(arrays["layers"], dtype=np.int64)
    if L is not None:
        from models.neurons import second_order
        so = second_order(lm, images, L, phi=True)
        arrays.update(so.numpy())
        arrays["second_order_heads"] = np.asarray(so.heads, dtype=np.int64).reshape(-1, 2)
        arrays["second_order_layer"] = np.asarray(L, dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    shapes = {k: list(v.shape) for k, v in arrays.items()}
    print(json.dumps({"out": str(out), "model_id": lm.model_id, "shapes": shapes}))
    return 0


def generated_images(lm, n: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields plus noise, as model inputs [n, 3, S, S] (normalised like real images)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    S = lm.image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    imgs = []
    for _ in range(n):
        f = torch.randn(3, 3, generator=g)
        base = torch.stack([f[c, 0] * xx + f[c, 1] * yy + f[c, 2] * xx * yy for c in range(3)])
        imgs.append(base + 0.3 * torch.randn(3, S, S, generator=g))
    return torch.stack(imgs)


def verify(lm, n_images: int = 4, providers=None) -> dict:
    from models import decompose
    from models.onnx import OnnxRunner, export_onnx, select_providers
    x = generated_images(lm, n_images)
    full = decompose(lm, x, "all")
    err = (full.head_cls.sum((1, 2)) + full.rest - full.embedding).norm(dim=-1) / full.embedding.norm(dim=-1)
    ref = decompose(lm, x, "last4", tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxRunner(export_onnx(lm, Path(tmp) / "verify.onnx", "last4", tokens=True),
                            providers=select_providers(providers))
        got = runner(x)
        parity = max((getattr(got, k) - getattr(ref, k).cpu()).abs().max().item()
                     for k in ("embedding", "head_cls", "rest", "head_tokens"))
        provider = runner.provider
    return {"model_id": lm.model_id, "identity_max_rel_err": err.max().item(),
            "onnx_max_abs_err": parity, "onnx_provider": provider}


def run_verify(args) -> int:
    lm = load_model_from_args(args)
    if lm.device.type != "cpu" or args.precision != "fp32":
        from models import load_model
        lm = load_model(**{k: v for k, v in lm.spec.items()})  # ONNX export runs from float32 on CPU
    report = verify(lm, args.n_images, args.providers)
    print(json.dumps(report))
    ok = report["identity_max_rel_err"] <= 1e-4 and report["onnx_max_abs_err"] <= 1e-3
    return 0 if ok else 1
