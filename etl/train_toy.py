r"""Train the bundled toy CLIP (``toy-shapes``) contrastively on freshly generated shapes scenes.

    python -m etl train-toy [--steps 1000] [--batch-size 128] [--seed 0] [--resume]

The shipped weights come from two runs (about 39 min on one core of a shared 2-core CPU):

    python -m etl train-toy --threads 1
    cp models/toy/toy-shapes.safetensors var/toy-phase1.safetensors
    python -m etl train-toy --threads 1 --init var/toy-phase1.safetensors --start-index 128000 \
        --steps 800 --lr 7e-4 --factor-weights shape=4,count=2 --single-prob 0.7 \
        --checkpoint-dir var/toy-train-phase2

Every step draws a fresh batch from the shapes world ``--seed``: groups of minimal variants
(a random scene plus copies that change one factor), deterministic by (seed, start index,
step), so a run resumes exactly: the checkpoint holds model, optimiser, step and torch RNG.
Loss = CLIP contrastive loss with exact multi-positive targets (a caption is a positive of
every image it is true of) + a per-factor term (each image against the one-factor captions
of every value of each factor) + a text-side paraphrase term. CPU only; a tqdm bar shows
the loss, the learnt temperature and the in-batch image->text accuracy.

Output: ``models/toy/toy-shapes.safetensors`` (float16, loaded back into float32) plus
periodic checkpoints and a log.jsonl under ``var/toy-train/`` (``$ATLAS_HOME`` replaces ``var``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOY_DIR = REPO / "models" / "toy"
MODEL_NAME = "toy-shapes"

# open_clip's default (OpenAI) normalisation, which the toy config inherits
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def default_ckpt_dir() -> Path:
    return Path(os.environ.get("ATLAS_HOME", REPO / "var")) / "toy-train"


def toy_configs() -> list[str]:
    """The toy architectures of the zoo: every ``models/toy/*.json``."""
    return sorted(p.stem for p in TOY_DIR.glob("*.json"))


def create_toy_model(seed: int | None = None, name: str = MODEL_NAME):
    """A randomly initialised toy open_clip model ``name`` (float32, train mode) and its tokenizer."""
    import open_clip
    import torch
    open_clip.add_model_config(str(TOY_DIR))
    if seed is not None:
        torch.manual_seed(seed)
    import logging
    lvl = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)      # "no pretrained weights" is expected
    try:
        model = open_clip.create_model(name)
    finally:
        logging.getLogger().setLevel(lvl)
    tok = open_clip.get_tokenizer(name)
    return model, tok


def images_to_tensor(images: np.ndarray):
    """uint8 [B, S, S, 3] -> normalised float32 tensor [B, 3, S, S].

    Same result as open_clip's eval transform on a PIL image that is already S x S.
    """
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_trimmed(model, tokens):
    """``model.encode_text`` on tokens [B, C] trimmed to the longest caption in the batch.

    The text tower is causal and pools at the end-of-text token, so the padding after it
    cannot change the result; trimming only saves compute. Returns [B, d] (not normalised).
    """
    import torch
    lengths = (tokens != 0).sum(1)
    L = int(lengths.max().item()) if tokens.numel() else 1
    t = tokens[:, :max(L, 1)]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:t.shape[1]].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:t.shape[1], :t.shape[1]])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.02) -> float:
    """Linear warm-up then cosine decay to ``final_frac * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def param_groups(model, weight_decay: float):
    """AdamW groups: decay on matrices, none on gains, biases, embeddings' scale and temperature."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:       # biases, LayerNorm gains, class embedding, logit_scale
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def save_fp16(model, path: Path, meta: dict) -> None:
    """Write the state dict as float16 safetensors (atomically)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().to("cpu").half().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def load_toy_weights(model, path: Path | str) -> None:
    """Load weights into a float32 toy model: fp16/fp32 safetensors (safe loading, no pickle),
    or the model of a train-toy checkpoint ``.pt`` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".pt":
        import torch
        sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    else:
        from safetensors.torch import load_file
        sd = load_file(str(path))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m != "attn_mask"]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model's config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


# factors a group variant may change, with weights (the hard, spatial ones more often)
VARY_WEIGHTS = {"shape": 3, "color": 1, "size": 1, "position": 3, "count": 3, "pattern": 2,
                "background": 1}


def training_scenes(step: int, seed: int, batch_size: int, group_size: int = 1, size: int = 64,
                    partial_prob: float = 0.5, start_index: int = 0, single_prob: float = 0.0):
    """The scenes of one training step, deterministic by (seed, start_index, step).

    group_size 1: scenes ``start_index + step*B ..`` of world ``seed`` (independent factors).
    group_size k > 1: B/k groups of minimal variants: a random factor record and k-1 copies
    that each change one factor (drawn by VARY_WEIGHTS) to another value, so that the batch
    holds hard negatives for shape, position and count; a group's base scene is a single
    object with extra probability ``single_prob`` (single objects meet the patch grid at a
    fixed phase, where shapes are learnt fastest). Returns a list of Scene.
    """
    from etl import shapes
    first = start_index + step * batch_size
    if group_size <= 1:
        return [shapes.scene(first + j, seed, size, partial_prob) for j in range(batch_size)]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, first, 0x6772])
    names = list(VARY_WEIGHTS)
    w = np.array([VARY_WEIGHTS[k] for k in names], float)
    w /= w.sum()
    records = []
    while len(records) < batch_size:
        base = shapes.sample_factors(rng)
        if rng.random() < single_prob:
            base["count"] = "1"
        records.append(base)
        for _ in range(group_size - 1):
            k = names[int(rng.choice(len(names), p=w))]
            others = [v for v in shapes.FACTORS[k] if v != base[k]]
            records.append({**base, k: others[int(rng.integers(len(others)))]})
    return [shapes.scene(first + j, seed, size, partial_prob, fix=rec)
            for j, rec in enumerate(records[:batch_size])]


def consistency(scenes) -> np.ndarray:
    """bool [B text, B image]: caption j is true of image i (agrees on every factor j names)."""
    from etl import shapes
    names = shapes.FACTOR_NAMES
    codes = np.array([[shapes.FACTORS[n].index(s.factors[n]) for n in names] for s in scenes])
    named = np.array([[n in s.named for n in names] for s in scenes])
    same = codes[:, None, :] == codes[None, :, :]                      # [B, B, F]
    return (same | ~named[:, None, :]).all(-1)


def contrastive_loss(logits, targets: str, consistent=None):
    """CLIP loss on logits [B image, B text].

    targets 'diagonal': the standard loss (caption i belongs to image i only);
    'exact': multi-positive soft targets from ``consistent`` [B text, B image] (bool), i.e.
    every image a caption is true of is a positive, uniformly weighted.
    """
    import torch
    import torch.nn.functional as F
    B = logits.shape[0]
    if targets == "diagonal":
        labels = torch.arange(B)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    m = torch.as_tensor(consistent, dtype=torch.float32)              # [text, image]
    t_img = m.T / m.T.sum(1, keepdim=True)                             # image -> its true captions
    t_txt = m / m.sum(1, keepdim=True)                                 # caption -> its true images
    li = -(t_img * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(t_txt * F.log_softmax(logits.T, 1)).sum(1).mean()
    return 0.5 * (li + lt)


_OLD_DEFAULTS = {"group_size": 1, "targets": "diagonal", "factor_loss": 0.0, "text_loss": 0.0,
                 "pos_init_scale": 1.0, "single_prob": 0.0,
                 "factor_weights": "shape=2", "model": MODEL_NAME}   # checkpoints written before these flags


def factor_captions(variant: int) -> tuple[list[str], list[tuple[str, int, int]]]:
    """One caption per factor value, naming only that value (``shapes.factor_caption``).

    Returns (texts, spans) with spans = (factor, first row, number of values) into texts.
    """
    from etl import shapes
    texts, spans = [], []
    for k, (f, values) in enumerate(shapes.FACTORS.items()):
        spans.append((f, len(texts), len(values)))
        texts += [shapes.factor_caption(f, v, variant + 7 * k) for v in values]
    return texts, spans


FACTOR_LOSS_WEIGHTS = {"shape": 2.0}      # shapes are the slowest factor for a small ViT


def parse_factor_weights(text: str) -> dict[str, float]:
    """'shape=2,count=1.5' -> {'shape': 2.0, 'count': 1.5}; unnamed factors weigh 1."""
    from etl import shapes
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, val = part.partition("=")
        if not sep or name.strip() not in shapes.FACTORS:
            raise ValueError(f"bad --factor-weights entry {part!r}: expected FACTOR=WEIGHT with "
                             f"FACTOR one of {list(shapes.FACTORS)}")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise ValueError(f"bad --factor-weights entry {part!r}: {val!r} is not a number") from None
        if out[name.strip()] < 0:
            raise ValueError(f"bad --factor-weights entry {part!r}: weights must be >= 0")
    return out


def factor_loss(scale, img_f, txt_f, spans, scenes, weights: dict[str, float] | None = None):
    """Contrastive loss of every image against the captions of each factor's values.

    img_f [B, d], txt_f [V, d] (unit); for each factor, a softmax over that factor's value
    captions with the image's own value as the positive; mean over factors.
    """
    import torch
    import torch.nn.functional as F
    from etl import shapes
    losses = []
    weights = FACTOR_LOSS_WEIGHTS if weights is None else weights
    ws = []
    for f, a, n in spans:
        target = torch.tensor([shapes.FACTORS[f].index(s.factors[f]) for s in scenes])
        losses.append(F.cross_entropy(scale * img_f @ txt_f[a:a + n].T, target))
        ws.append(weights.get(f, 1.0))
    w = torch.tensor(ws)
    return (torch.stack(losses) * w).sum() / w.sum()


def paraphrase_loss(scale, txt_a, txt_b, spans):
    """Text-side contrastive term: two wordings of every factor value's caption must match
    each other and no other value of the same factor.

    txt_a, txt_b [V, d] (unit), rows aligned by value. Keeps the text tower from collapsing
    the words of factors the image tower has not learnt yet ("top left" vs "bottom right"),
    which would otherwise leave the image tower without a gradient for them.
    """
    import torch
    import torch.nn.functional as F
    losses = []
    for _, a, n in spans:
        lg = scale * txt_a[a:a + n] @ txt_b[a:a + n].T
        target = torch.arange(n)
        losses.append(0.5 * (F.cross_entropy(lg, target) + F.cross_entropy(lg.T, target)))
    return torch.stack(losses).mean()


def train(args) -> Path | None:
    """Run (or resume) training; returns the weights path, or None when --stop-at ended it early."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from etl import shapes

    if args.steps <= 0 or args.batch_size <= 1:
        raise SystemExit("--steps must be > 0 and --batch-size > 1")
    torch.set_num_threads(args.threads)
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "last.pt"
    out = Path(args.out or TOY_DIR / f"{args.model}.safetensors")

    model, tok = create_toy_model(args.seed, args.model)
    if args.init and not args.resume:
        load_toy_weights(model, args.init)          # .safetensors or a train-toy checkpoint .pt
    elif args.pos_init_scale != 1.0:
        # open_clip draws the image position embedding with std width**-0.5 (0.09 here), far
        # below the patch embeddings (~0.6): a small ViT then takes very long to see *where*
        # things are. A larger draw fixes it (measured: position probe 0.8 vs chance at 120 steps).
        with torch.no_grad():
            model.visual.positional_embedding.mul_(args.pos_init_scale)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    start = 0
    elapsed = 0.0
    log_path = ckpt_dir / "log.jsonl"
    if args.resume:
        if not ckpt.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k in ("seed", "batch_size", "steps", "start_index", "group_size", "targets", "factor_loss",
                  "text_loss", "pos_init_scale", "single_prob",
                  "factor_weights", "model"):
            if state["args"].get(k, _OLD_DEFAULTS.get(k, 0)) != getattr(args, k):
                raise SystemExit(f"--resume: checkpoint was made with --{k.replace('_', '-')} "
                                 f"{state['args'].get(k, _OLD_DEFAULTS.get(k, 0))}, this run asks for {getattr(args, k)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        elapsed = float(state.get("elapsed", 0.0))
        print(f"resumed from {ckpt} at step {start}", file=sys.stderr)
    elif log_path.exists():
        log_path.unlink()

    def checkpoint(step: int) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), "elapsed": elapsed,
                    "args": {"seed": args.seed, "batch_size": args.batch_size, "steps": args.steps,
                             "start_index": args.start_index, "group_size": args.group_size,
                             "targets": args.targets, "factor_loss": args.factor_loss,
                             "text_loss": args.text_loss, "pos_init_scale": args.pos_init_scale,
                             "single_prob": args.single_prob, "factor_weights": args.factor_weights,
                             "model": args.model}},
                   tmp)
        os.replace(tmp, ckpt)

    fweights = parse_factor_weights(args.factor_weights)
    B = args.batch_size
    warmup = max(1, int(args.warmup * args.steps)) if args.warmup < 1 else int(args.warmup)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train-toy",
               dynamic_ncols=True, mininterval=2.0, disable=args.no_progress)
    ema = None
    t_last = time.perf_counter()
    for step in bar:
        scenes = training_scenes(step, args.seed, B, args.group_size, args.image_size,
                                 args.partial_prob, args.start_index, args.single_prob)
        x = images_to_tensor(np.stack([sc.image for sc in scenes]))
        t = tok([sc.caption for sc in scenes])
        cons = consistency(scenes)
        lr = lr_at(step, args.steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(encode_text_trimmed(model, t), dim=-1)
        scale = model.logit_scale.exp()
        logits = scale * img_f @ txt_f.T
        loss = contrastive_loss(logits, args.targets, cons)
        if args.factor_loss > 0 or args.text_loss > 0:
            va, vb = (int(v) for v in torch.randint(0, 1 << 20, (2,)))
            ftexts, spans = factor_captions(va)
            ftxt = F.normalize(encode_text_trimmed(model, tok(ftexts)), dim=-1)
            if args.factor_loss > 0:
                loss = loss + args.factor_loss * factor_loss(scale, img_f, ftxt, spans, scenes, fweights)
            if args.text_loss > 0:
                btexts, _ = factor_captions(vb)
                btxt = F.normalize(encode_text_trimmed(model, tok(btexts)), dim=-1)
                loss = loss + args.text_loss * paraphrase_loss(scale, ftxt, btxt, spans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            acc = float(cons.T[np.arange(B), logits.argmax(1).numpy()].mean())   # a true caption
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", T=f"{scale.item():.1f}", acc=f"{acc:.2f}", lr=f"{lr:.1e}",
                        refresh=False)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": done, "loss": round(ema, 4), "acc": round(acc, 3),
                                     "scale": round(scale.item(), 2), "lr": lr,
                                     "elapsed_s": round(elapsed, 1)}) + "\n")
        if done % args.checkpoint_every == 0 or done == args.steps:
            checkpoint(done)
            if args.snapshot_out:
                save_fp16(model, out, {"step": done, "seed": args.seed, "partial": True})
        if args.stop_at and done >= args.stop_at and done < args.steps:
            checkpoint(done)
            bar.close()
            print(f"stopped at step {done} of {args.steps}; continue with --resume "
                  f"(checkpoint {ckpt})", file=sys.stderr)
            return None
    bar.close()
    model.eval()
    meta = {"model": args.model, "step": args.steps, "seed": args.seed, "batch_size": B, "lr": args.lr,
            "start_index": args.start_index, "init": args.init or "",
            "group_size": args.group_size, "targets": args.targets, "factor_loss": args.factor_loss,
            "text_loss": args.text_loss, "pos_init_scale": args.pos_init_scale,
            "single_prob": args.single_prob, "factor_weights": args.factor_weights,
            "train_seconds": round(elapsed, 1), "command": " ".join(sys.argv)}
    save_fp16(model, out, meta)
    print(json.dumps({"weights": str(out), "bytes": out.stat().st_size, **meta}))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=MODEL_NAME, choices=toy_configs(),
                   help=f"toy architecture to train (a models/toy/*.json config; default {MODEL_NAME})")
    p.add_argument("--steps", type=int, default=1000,
                   help="optimiser steps (each on a fresh batch of scenes); default 1000 "
                        "(~25-40 min on a shared 2-core CPU)")
    p.add_argument("--batch-size", type=int, default=128, help="scenes per step (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=float, default=0.05,
                   help="warm-up steps; a value < 1 is a fraction of --steps (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay on weight matrices (default 0.1)")
    p.add_argument("--group-size", type=int, default=4,
                   help="scenes per group of minimal variants (a random scene plus copies that "
                        "each change one factor): hard negatives for shape/position/count; "
                        "1 = independent scenes (default 4)")
    p.add_argument("--targets", choices=["exact", "diagonal"], default="exact",
                   help="contrastive targets: 'exact' = every image a caption is true of is a "
                        "positive (known factors); 'diagonal' = standard CLIP (default exact)")
    p.add_argument("--factor-loss", type=float, default=1.0,
                   help="weight of the per-factor contrastive term: each image against the "
                        "one-factor captions of every value of each factor ('a red shape' vs "
                        "'a blue shape' ...), a weighted mean over factors (--factor-weights); "
                        "0 disables (default 1.0)")
    p.add_argument("--factor-weights", default="shape=2",
                   help="weights of the factors in the factor term, FACTOR=W,...; unnamed "
                        "factors weigh 1 (default 'shape=2')")
    p.add_argument("--text-loss", type=float, default=1.0,
                   help="weight of the text-side paraphrase term: two wordings of each factor "
                        "value's caption match each other, not the other values; keeps factor "
                        "words apart in the text tower; 0 disables (default 1.0)")
    p.add_argument("--single-prob", type=float, default=0.5,
                   help="extra probability that a group's base scene holds a single object "
                        "(only with --group-size > 1; default 0.5)")
    p.add_argument("--pos-init-scale", type=float, default=10.0,
                   help="multiply open_clip's initial image position embedding (std width^-0.5) "
                        "by this; 1 keeps open_clip's init (default 10)")
    p.add_argument("--partial-prob", type=float, default=0.5,
                   help="share of captions that name only a random subset of the factors "
                        "(the rest name all of them; default 0.5)")
    p.add_argument("--image-size", type=int, default=64,
                   help="scene size in pixels; must match the config's image_size (default 64)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init and of the shapes world used for training (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--checkpoint-dir", default=str(default_ckpt_dir()),
                   help="where last.pt and log.jsonl go (default $ATLAS_HOME/toy-train, ATLAS_HOME=var)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="write a resumable checkpoint every N steps (default 100)")
    p.add_argument("--log-every", type=int, default=20, help="append a log.jsonl line every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from <checkpoint-dir>/last.pt (same --seed/--steps/--batch-size)")
    p.add_argument("--init", default=None,
                   help="start from these safetensors weights instead of a random init "
                        "(a second training phase); the scenes still come from --seed, "
                        "starting at --start-index")
    p.add_argument("--start-index", type=int, default=0,
                   help="first scene index of the training stream (default 0); a second phase "
                        "should start after the scenes the first one used (steps x batch size)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="checkpoint and stop after this step (0: run to --steps); "
                        "continue later with --resume")
    p.add_argument("--out", default=None,
                   help="final float16 safetensors (default models/toy/<model>.safetensors)")
    p.add_argument("--snapshot-out", action="store_true",
                   help="also rewrite --out at every checkpoint (useful to evaluate mid-run)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# The zoo recipe: every shipped toy model is trained by these two phases (the first from a
# random init with the defaults, the second continuing on fresh scenes with shape and count
# weighted up and more single objects). Flags as train-toy takes them.
RECIPE_PHASES: tuple[tuple[str, list[str]], ...] = (
    ("phase1", ["--steps", "1000"]),
    ("phase2", ["--steps", "800", "--start-index", "128000", "--lr", "7e-4",
                "--factor-weights", "shape=4,count=2", "--single-prob", "0.7"]),
)


def train_recipe(model: str, seed: int = 0, threads: int = 1, out: str | None = None,
                 work_dir: str | None = None, no_progress: bool = False) -> Path:
    """Train ``model`` by the zoo recipe (RECIPE_PHASES), resuming whatever is already done.

    Each phase checkpoints under ``work_dir/<phase>/`` and writes ``work_dir/<phase>.safetensors``;
    the next phase starts from it. A re-run skips finished phases and resumes a started one.
    Returns the final weights (default models/toy/<model>.safetensors).
    """
    work = Path(work_dir or default_ckpt_dir() / f"{model}-seed{seed}")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    init = None
    for i, (phase, flags) in enumerate(RECIPE_PHASES):
        last = i == len(RECIPE_PHASES) - 1
        phase_out = Path(out or TOY_DIR / f"{model}.safetensors") if last else work / f"{phase}.safetensors"
        done = work / f"{phase}.done"
        if not done.exists():
            argv = ["--model", model, "--seed", str(seed), "--threads", str(threads),
                    "--checkpoint-dir", str(work / phase), "--out", str(phase_out), *flags]
            if init:
                argv += ["--init", str(init)]
            if (work / phase / "last.pt").exists():
                argv.append("--resume")
            if no_progress:
                argv.append("--no-progress")
            print(f"train-zoo {model} seed {seed}: {phase}", file=sys.stderr)
            train(parser.parse_args(argv))
            done.write_text(str(phase_out))
        init = phase_out
    return Path(init)


def _cli(args) -> int:
    train(args)
    return 0


def _cli_recipe(args) -> int:
    print(train_recipe(args.model, args.seed, args.threads, args.out, args.work_dir, args.no_progress))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-toy`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "train-toy", help="train the bundled toy CLIP on the shapes world (CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cli)
    z = subparsers.add_parser(
        "train-zoo", help="train a toy model of the zoo by the shipped two-phase recipe (resumable)",
        description="Train a models/toy/*.json architecture by the zoo recipe (the two phases of "
                    "RECIPE_PHASES in etl/train_toy.py); a re-run resumes where it stopped. "
                    "Example: python -m etl train-zoo --model toy-shapes-small --seed 0")
    z.add_argument("--model", required=True, choices=toy_configs(), help="toy architecture")
    z.add_argument("--seed", type=int, default=0, help="init and training-world seed (default 0)")
    z.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    z.add_argument("--out", default=None, help="final weights (default models/toy/<model>.safetensors)")
    z.add_argument("--work-dir", default=None,
                   help="phase checkpoints and weights (default $ATLAS_HOME/toy-train/<model>-seed<seed>)")
    z.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    z.set_defaults(func=_cli_recipe)
    return p


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m etl.train_toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
