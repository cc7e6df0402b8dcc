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
every image it is true of), or SigLIP's sigmoid loss with the same targets for a model whose
config has a logit bias (``init_logit_bias``, e.g. toy-shapes-map; weighed by ``--sigmoid-weight``) + a per-factor term (each image against the one-factor captions
of every value of each factor) + a text-side paraphrase term. CPU only; a tqdm bar shows
the loss, the learnt temperature and the in-batch image->text accuracy.

Output: ``models/toy/toy-shapes.safetensors`` (float16, loaded back into float32) plus
periodic checkpoints and a log.jsonl under ``var/toy-train/`` (``$ATLAS_HOME`` replaces ``var``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import models
from models import position_embedding

MODEL_NAME = "toy-shapes"


def default_ckpt_dir() -> Path:
    """``$ATLAS_HOME/toy-train``."""
    from warehouse import atlas_home
    return atlas_home() / "toy-train"


def toy_model(name: str = MODEL_NAME, seed: int = 0):
    """A seeded random toy open_clip model ``name`` (float32, train mode) and its tokenizer."""
    from models import load_model
    lm = load_model(name, random_init=True, seed=seed)
    return lm.model.train(), lm.tokenizer


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
    from etl.world import shapes
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
    from etl.world import shapes
    names = shapes.FACTOR_NAMES
    codes = np.array([[shapes.FACTORS[n].index(s.factors[n]) for n in names] for s in scenes])
    named = np.array([[n in s.named for n in names] for s in scenes])
    same = codes[:, None, :] == codes[None, :, :]                      # [B, B, F]
    return (same | ~named[:, None, :]).all(-1)


def sigmoid_loss(logits, targets: str, consistent=None):
    """SigLIP's pairwise sigmoid loss on logits [B image, B text] (scale * cosine + bias): every
    (image, caption) pair is one binary question, -sum log sigmoid(label * logit) / B.

    targets 'diagonal': label +1 for caption i of image i, -1 for every other pair (SigLIP's own);
    'exact': label +1 for every pair whose caption is true of the image (``consistent``
    [B text, B image], bool), -1 otherwise.
    """
    import torch
    import torch.nn.functional as F
    B = logits.shape[0]
    if targets == "diagonal":
        positive = torch.eye(B, dtype=torch.bool)
    else:
        positive = torch.as_tensor(consistent, dtype=torch.bool).T               # [image, text]
    labels = positive.to(logits.dtype) * 2 - 1                                    # +1 / -1
    return -F.logsigmoid(labels * logits).sum() / B


def uses_sigmoid_loss(model) -> bool:
    """Whether a model trains with SigLIP's sigmoid loss: open_clip gives a model a learnt
    ``logit_bias`` exactly when its config sets ``init_logit_bias`` (SigLIP configs do)."""
    return getattr(model, "logit_bias", None) is not None


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
                 "pos_init_scale": 1.0, "single_prob": 0.0, "sigmoid_weight": 1.0,
                 "factor_weights": "shape=2", "model": MODEL_NAME}   # checkpoints written before these flags


def factor_captions(variant: int) -> tuple[list[str], list[tuple[str, int, int]]]:
    """One caption per factor value, naming only that value (``shapes.factor_caption``).

    Returns (texts, spans) with spans = (factor, first row, number of values) into texts.
    """
    from etl.world import shapes
    texts, spans = [], []
    for k, (f, values) in enumerate(shapes.FACTORS.items()):
        spans.append((f, len(texts), len(values)))
        texts += [shapes.factor_caption(f, v, variant + 7 * k) for v in values]
    return texts, spans


FACTOR_LOSS_WEIGHTS = {"shape": 2.0}      # shapes are the slowest factor for a small ViT


def parse_factor_weights(text: str) -> dict[str, float]:
    """'shape=2,count=1.5' -> {'shape': 2.0, 'count': 1.5}; unnamed factors weigh 1."""
    from etl.world import shapes
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
    from etl.world import shapes
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


# Weight of SigLIP's sigmoid loss in the total (models with a logit bias only; the softmax loss
# of the class-token toys always weighs 1). The sigmoid loss sums B binary terms per image, so
# on the recipe's batches (B 128, ~4.6 true captions per image) its image-tower gradient is
# 4-7x the softmax loss's and 6-20x the factor term's: under the recipe's grad-norm clip it
# drowns the factor and paraphrase terms, and toy-shapes-map trained at weight 1 never learnt
# position or shape. At 0.2 its gradient is about the softmax loss's.
SIGMOID_WEIGHT = 0.2


@dataclass
class TrainConfig:
    """One training run (``python -m etl train-toy --help`` explains every field)."""
    model: str = MODEL_NAME
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    group_size: int = 4
    targets: str = "exact"
    factor_loss: float = 1.0
    factor_weights: str = "shape=2"
    text_loss: float = 1.0
    sigmoid_weight: float = SIGMOID_WEIGHT
    single_prob: float = 0.5
    pos_init_scale: float = 10.0
    partial_prob: float = 0.5
    image_size: int = 64
    seed: int = 0
    threads: int = 2
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 100
    log_every: int = 20
    resume: bool = False
    init: Optional[str] = None
    start_index: int = 0
    stop_at: int = 0
    out: Optional[str] = None
    snapshot_out: bool = False
    no_progress: bool = False


def train(cfg: TrainConfig) -> Path | None:
    """Run (or resume) training; returns the weights path, or None when --stop-at ended it early."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if cfg.steps <= 0 or cfg.batch_size <= 1:
        raise SystemExit("--steps must be > 0 and --batch-size > 1")
    torch.set_num_threads(cfg.threads)
    ckpt_dir = Path(cfg.checkpoint_dir or default_ckpt_dir())
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "last.pt"
    out = Path(cfg.out or models.TOY_DIR / f"{cfg.model}.safetensors")

    model, tok = toy_model(cfg.model, cfg.seed)
    if cfg.init and not cfg.resume:
        models.load_state(model, cfg.init, cfg.model)   # .safetensors or a train-toy checkpoint .pt
    elif cfg.pos_init_scale != 1.0:
        # open_clip draws the image position embedding with std width**-0.5 (0.09 here), far
        # below the patch embeddings (~0.6): a small ViT then takes very long to see *where*
        # things are. A larger draw fixes it (measured: position probe 0.8 vs chance at 120 steps).
        # (The zoo's timm towers draw theirs the same way: models/towers/toys.py.)
        pos = position_embedding(model.visual)
        if pos is None:
            raise SystemExit(f"--pos-init-scale {cfg.pos_init_scale}: {cfg.model} has no learnt position "
                             "embedding; pass --pos-init-scale 1")
        with torch.no_grad():
            pos.mul_(cfg.pos_init_scale)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    start = 0
    elapsed = 0.0
    log_path = ckpt_dir / "log.jsonl"
    if cfg.resume:
        if not ckpt.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k in ("seed", "batch_size", "steps", "start_index", "group_size", "targets", "factor_loss",
                  "text_loss", "pos_init_scale", "single_prob",
                  "factor_weights", "model") + (("sigmoid_weight",) if uses_sigmoid_loss(model) else ()):
            if state["args"].get(k, _OLD_DEFAULTS.get(k, 0)) != getattr(cfg, k):
                raise SystemExit(f"--resume: checkpoint was made with --{k.replace('_', '-')} "
                                 f"{state['args'].get(k, _OLD_DEFAULTS.get(k, 0))}, this run asks for {getattr(cfg, k)}")
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
                    "args": {"seed": cfg.seed, "batch_size": cfg.batch_size, "steps": cfg.steps,
                             "start_index": cfg.start_index, "group_size": cfg.group_size,
                             "targets": cfg.targets, "factor_loss": cfg.factor_loss,
                             "text_loss": cfg.text_loss, "pos_init_scale": cfg.pos_init_scale,
                             "single_prob": cfg.single_prob, "factor_weights": cfg.factor_weights,
                             "model": cfg.model,
                             **({"sigmoid_weight": cfg.sigmoid_weight} if sigmoid else {})}},
                   tmp)
        os.replace(tmp, ckpt)

    fweights = parse_factor_weights(cfg.factor_weights)
    sigmoid = uses_sigmoid_loss(model)
    B = cfg.batch_size
    warmup = max(1, int(cfg.warmup * cfg.steps)) if cfg.warmup < 1 else int(cfg.warmup)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train-toy",
               dynamic_ncols=True, mininterval=2.0, disable=cfg.no_progress)
    ema = None
    t_last = time.perf_counter()
    for step in bar:
        scenes = training_scenes(step, cfg.seed, B, cfg.group_size, cfg.image_size,
                                 cfg.partial_prob, cfg.start_index, cfg.single_prob)
        x = models.pixels_to_tensor(model, np.stack([sc.image for sc in scenes]))
        t = tok([sc.caption for sc in scenes])
        cons = consistency(scenes)
        lr = lr_at(step, cfg.steps, cfg.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(models.encode_tokens(model, t), dim=-1)
        scale = model.logit_scale.exp()
        logits = scale * img_f @ txt_f.T                                  # [image, text]
        if sigmoid:
            loss = cfg.sigmoid_weight * sigmoid_loss(logits + model.logit_bias, cfg.targets, cons)
        else:
            loss = contrastive_loss(logits, cfg.targets, cons)
        if cfg.factor_loss > 0 or cfg.text_loss > 0:
            va, vb = (int(v) for v in torch.randint(0, 1 << 20, (2,)))
            ftexts, spans = factor_captions(va)
            ftxt = F.normalize(models.encode_tokens(model, tok(ftexts)), dim=-1)
            if cfg.factor_loss > 0:
                loss = loss + cfg.factor_loss * factor_loss(scale, img_f, ftxt, spans, scenes, fweights)
            if cfg.text_loss > 0:
                btexts, _ = factor_captions(vb)
                btxt = F.normalize(models.encode_tokens(model, tok(btexts)), dim=-1)
                loss = loss + cfg.text_loss * paraphrase_loss(scale, ftxt, btxt, spans)
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
                        **({"b": f"{model.logit_bias.item():.1f}"} if sigmoid else {}), refresh=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": done, "loss": round(ema, 4), "acc": round(acc, 3),
                                     "scale": round(scale.item(), 2), "lr": lr,
                                     **({"bias": round(model.logit_bias.item(), 3)} if sigmoid else {}),
                                     "elapsed_s": round(elapsed, 1)}) + "\n")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done)
            if cfg.snapshot_out:
                save_fp16(model, out, {"step": done, "seed": cfg.seed, "partial": True})
        if cfg.stop_at and done >= cfg.stop_at and done < cfg.steps:
            checkpoint(done)
            bar.close()
            print(f"stopped at step {done} of {cfg.steps}; continue with --resume "
                  f"(checkpoint {ckpt})", file=sys.stderr)
            return None
    bar.close()
    model.eval()
    meta = {"model": cfg.model, "step": cfg.steps, "seed": cfg.seed, "batch_size": B, "lr": cfg.lr,
            "start_index": cfg.start_index, "init": cfg.init or "",
            "group_size": cfg.group_size, "targets": cfg.targets, "factor_loss": cfg.factor_loss,
            "text_loss": cfg.text_loss, "pos_init_scale": cfg.pos_init_scale,
            "single_prob": cfg.single_prob, "factor_weights": cfg.factor_weights,
            "loss": "sigmoid" if sigmoid else "softmax",
            **({"sigmoid_weight": cfg.sigmoid_weight} if sigmoid else {}),
            "train_seconds": round(elapsed, 1), "command": " ".join(sys.argv)}
    save_fp16(model, out, meta)
    print(json.dumps({"weights": str(out), "bytes": out.stat().st_size, **meta}))
    return out


# The zoo recipe: every shipped toy model is trained by these two phases (the first from a
# random init with the defaults, the second continuing on fresh scenes with shape and count
# weighted up and more single objects). TrainConfig fields.
RECIPE_PHASES: tuple[tuple[str, dict], ...] = (
    ("phase1", dict(steps=1000)),
    ("phase2", dict(steps=800, start_index=128000, lr=7e-4, factor_weights="shape=4,count=2", single_prob=0.7)),
)


def train_recipe(model: str, seed: int = 0, threads: int = 1, out: str | None = None,
                 work_dir: str | None = None, no_progress: bool = False) -> Path:
    """Train ``model`` by the zoo recipe (RECIPE_PHASES), resuming whatever is already done.

    Each phase checkpoints under ``work_dir/<phase>/`` and writes ``work_dir/<phase>.safetensors``;
    the next phase starts from it. A re-run skips finished phases and resumes a started one.
    Returns the final weights (default models/toy/<model>.safetensors).
    """
    work = Path(work_dir or default_ckpt_dir() / f"{model}-seed{seed}")
    init = None
    for i, (phase, flags) in enumerate(RECIPE_PHASES):
        last = i == len(RECIPE_PHASES) - 1
        phase_out = Path(out or models.TOY_DIR / f"{model}.safetensors") if last else work / f"{phase}.safetensors"
        done = work / f"{phase}.done"
        if not done.exists():
            cfg = TrainConfig(model=model, seed=seed, threads=threads, checkpoint_dir=str(work / phase),
                              out=str(phase_out), init=str(init) if init else None,
                              resume=(work / phase / "last.pt").exists(), no_progress=no_progress, **flags)
            print(f"train-zoo {model} seed {seed}: {phase}", file=sys.stderr)
            train(cfg)
            done.write_text(str(phase_out))
        init = phase_out
    pack_weights(Path(init), model)
    return Path(init)


def recipe_decay(model: str, seed: int) -> list[list[float]]:
    """Per phase of RECIPE_PHASES, the factor AdamW's decoupled weight decay multiplies a decayed
    parameter by at each step: ``1 - lr_t * wd``, computed as torch's AdamW computes it."""
    phases = []
    for _, flags in RECIPE_PHASES:
        cfg = TrainConfig(model=model, seed=seed, **flags)
        warmup = max(1, int(cfg.warmup * cfg.steps)) if cfg.warmup < 1 else int(cfg.warmup)
        phases.append([1 - lr_at(step, cfg.steps, cfg.lr, warmup) * cfg.weight_decay for step in range(cfg.steps)])
    return phases


def pack_weights(path: Path, model: str) -> dict:
    """Rewrite a zoo weights file trained by the recipe in models.zoo_pack's lossless packed form
    (rows training never touched are rebuilt from the seed). The packed file is read back and
    compared bit for bit with the original before it replaces it; a file already packed is left.
    Returns {"bytes_before", "bytes_after", "packed": bool}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from models import zoo_pack
    from models.registry import read_safetensors
    path = Path(path)
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    before = path.stat().st_size
    if zoo_pack.is_packed(meta):
        return {"bytes_before": before, "bytes_after": before, "packed": False}
    seed = int(meta.get("seed", 0))
    state = load_file(str(path))
    init, _ = toy_model(model, seed)
    tensors, extra = zoo_pack.pack_state(state, {k: v.detach() for k, v in init.state_dict().items()},
                                         recipe_decay(model, seed), seed)
    tmp = path.with_name(path.stem + ".packed.safetensors")
    save_file(tensors, str(tmp), metadata={**meta, **extra})
    back = read_safetensors(tmp, model)
    same = back.keys() == state.keys() and all(
        back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
        and back[k].contiguous().numpy().tobytes() == state[k].contiguous().numpy().tobytes() for k in state)
    if not same:
        tmp.unlink()
        raise RuntimeError(f"packing {path} did not read back bit for bit; the full file is kept")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return {"bytes_before": before, "bytes_after": path.stat().st_size, "packed": True}
