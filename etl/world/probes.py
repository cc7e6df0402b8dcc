"""Per-head linear probes: how well does one head's embedding predict each ground-truth factor?

    python -m etl probe-heads [--n 2000] [--seed 2] [--layers all]   (fresh scenes, printed)
    python -m etl probe --model MODEL_ID --dataset shapes:N:seed=S     (stored embeddings, stored)

For every head (l, h) and every factor, a closed-form ridge classifier (one-hot targets,
standardised features plus a bias, ridge strength picked on a validation slice of the
training split) maps the head embedding ``c[l,h]`` [d] to the factor; accuracy is measured
on a held-out test split, beside the majority-class chance on the same split (predict the
training split's most frequent value). This head x factor matrix is the ground truth against
which TextSpan labels and the association / entanglement scores are judged.

``probe_matrix`` is pure numpy and is what the warehouse job calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from etl.blas import blas_threads
from warehouse import head_name

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)     # multiples of n_fit (features are standardised)


def split_indices(n: int, seed: int, test_frac: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Random train/test split of range(n): (train_idx, test_idx), deterministic by seed."""
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_frac)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _standardise(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score with training statistics, then a bias column. x: [G, n, d] -> [G, n, d+1]."""
    mu = x_tr.mean(1, keepdims=True)
    sd = x_tr.std(1, keepdims=True) + 1e-8
    def aug(x):
        z = (x - mu) / sd
        return np.concatenate([z, np.ones(z.shape[:2] + (1,), z.dtype)], axis=2)
    return aug(x_tr), aug(x_te)


def _ridge_predict(xf: np.ndarray, yf: np.ndarray, xs: list[np.ndarray], lams: Sequence[float]
                   ) -> list[list[np.ndarray]]:
    """Ridge fits for several strengths from one eigendecomposition per group.

    xf: [G, n, p] fit features, yf: [n, k] targets (shared by the groups), xs: feature arrays
    [G, m, p] to score. Returns out[j][i] = scores [G, m, k] of xs[i] under lams[j].
    """
    # batched matmuls (BLAS), not einsum: einsum's own loops made the probe job 10-20x slower
    xt = xf.transpose(0, 2, 1)                                # [G, p, n]
    gram = xt @ xf                                            # [G, p, p]
    evals, evecs = np.linalg.eigh(gram)                       # [G, p], [G, p, p]
    xty = xt @ yf                                             # [G, p, k]
    proj = evecs.transpose(0, 2, 1) @ xty                     # V^T X^T Y  [G, p, k]
    out = []
    for lam in lams:
        w = evecs @ (proj / (evals[..., None] + lam))         # [G, p, k]
        out.append([x @ w for x in xs])
    return out


@dataclass(frozen=True)
class FactorProbe:
    """Held-out predictions of one factor by every head's ridge probe (``probe_predictions``).

    test:    int [m]: the images (indices into the n images) of the factor's test split (cross-fitted:
             every image with a known value, each predicted by the fold that held it out)
    y:       int [m]: their true class (index into ``classes``)
    pred:    int [G, m]: each head's predicted class (G = L' x H heads, layer-major)
    classes: the factor's values, sorted
    chance:  majority-class accuracy on the test split (the training split's most frequent value)
    n_train: images the probes were fitted on (per fold, on average)
    """
    factor: str
    test: np.ndarray
    y: np.ndarray
    pred: np.ndarray
    classes: list
    chance: float
    n_train: int


def _check_heads(head_cls: np.ndarray, factors: dict, layers: Sequence[int] | None) -> tuple[np.ndarray, list[int]]:
    x = np.asarray(head_cls)
    if x.ndim != 4:
        raise ValueError(f"head_cls must be [n, layers, heads, d], got shape {x.shape}")
    n, L, H, d = x.shape
    if n < 8:
        raise ValueError(f"need at least 8 images to probe, got {n}")
    if not factors:
        raise ValueError("factors is empty: give at least one factor -> labels")
    layers = list(range(L)) if layers is None else [int(v) for v in layers]
    if len(layers) != L:
        raise ValueError(f"layers has {len(layers)} entries but head_cls has {L} layer slices")
    if not np.all(np.isfinite(x)):
        raise ValueError("head_cls contains NaN or inf")
    return x, layers


def _factor_labels(labels: Sequence, n: int, name: str):
    """(known image indices [k], class ids [k], classes) of one factor."""
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"factor {name!r} has {len(labels)} labels for {n} images")
    idx = np.flatnonzero(np.array([v is not None for v in labels]))
    if len(idx) < 8:
        raise ValueError(f"factor {name!r} has only {len(idx)} known labels (need >= 8)")
    classes = sorted({labels[i] for i in idx}, key=str)
    cid = {c: k for k, c in enumerate(classes)}
    return idx, np.array([cid[labels[i]] for i in idx]), classes


def _splits(k: int, fi: int, seed: int, test_frac: float, folds: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train positions, test positions) into a factor's k known images: one split (deterministic by
    seed and factor position), or with ``folds`` a cross-fitting: a seeded permutation cut into
    ``folds`` parts, each predicted once by a probe fitted on the others."""
    if not folds:
        return [split_indices(k, seed + 7919 * fi, test_frac)]
    if not 2 <= folds <= k:
        raise ValueError(f"folds must be in [2, {k}], got {folds}")
    parts = np.array_split(np.random.default_rng([seed, fi]).permutation(k), folds)
    return [(np.sort(np.concatenate(parts[:j] + parts[j + 1:])), np.sort(parts[j])) for j in range(folds)]


def _collect(name: str, idx, y, classes, splits, predict) -> FactorProbe:
    """One FactorProbe from ``predict(tr, te) -> pred [G, |te|]`` over the splits (their test parts
    concatenated; chance: each training part's majority class, scored on its test part)."""
    tests, preds, right = [], [], 0
    for tr, te in splits:
        maj = np.bincount(y[tr], minlength=len(classes)).argmax()
        right += int((y[te] == maj).sum())
        tests.append(te)
        preds.append(predict(tr, te))
    te = np.concatenate(tests)
    n_train = int(np.mean([len(tr) for tr, _ in splits]))
    return FactorProbe(name, idx[te], y[te], np.concatenate(preds, axis=1), classes, right / len(te), n_train)


def probe_predictions(head_cls: np.ndarray, factors: dict[str, Sequence], seed: int = 0,
                      layers: Sequence[int] | None = None, test_frac: float = 0.25,
                      folds: int | None = None) -> list[FactorProbe]:
    """Every head's held-out ridge-probe predictions of every factor (one ``FactorProbe`` each).

    head_cls: float [n, L', H, d], per-head embeddings c[l,h] (MATH.md §1) of n images.
    factors:  factor name -> n labels (any hashable; None marks an unknown label, skipped).
    seed:     seed of the train/test split (and of the validation slice that picks the ridge).
    folds:    None: one train/test split (``test_frac`` held out); K: cross-fitted, every image
              predicted once by a probe fitted on the other K - 1 parts (n test images, not n / 4).
    The ridge strength of each head is picked on a validation slice of the training part, then
    the probe is refitted on the whole training part and predicts the test part.
    """
    with blas_threads(1):
        return _probe_predictions(head_cls, factors, seed, layers, test_frac, folds)


def _probe_predictions(head_cls, factors, seed, layers, test_frac, folds) -> list[FactorProbe]:
    x, _ = _check_heads(head_cls, factors, layers)
    n, L, H, d = x.shape
    feats = x.astype(np.float64).reshape(n, L * H, d).transpose(1, 0, 2)     # [G, n, d]
    out = []
    for fi, (name, labels) in enumerate(factors.items()):
        idx, y, classes = _factor_labels(labels, n, name)
        onehot = np.eye(len(classes))[y]

        def predict(tr, te):
            if len(classes) == 1:
                return np.zeros((L * H, len(te)), dtype=np.int64)
            # ridge strength on a validation slice of the training part, then refit on it all
            fit, val = split_indices(len(tr), seed + 104729 * (fi + 1), 0.2)
            f_tr, f_val = _standardise(feats[:, idx[tr[fit]]], feats[:, idx[tr[val]]])
            lams = [a * len(fit) for a in RIDGE_GRID]
            val_scores = _ridge_predict(f_tr, onehot[tr[fit]], [f_val], lams)
            val_acc = np.stack([(s[0].argmax(2) == y[tr[val]][None]).mean(1) for s in val_scores])  # [J, G]
            best = val_acc.argmax(0)                                                   # [G]
            a_tr, a_te = _standardise(feats[:, idx[tr]], feats[:, idx[te]])
            te_scores = _ridge_predict(a_tr, onehot[tr], [a_te], [a * len(tr) for a in RIDGE_GRID])
            te_pred = np.stack([s[0].argmax(2) for s in te_scores])                  # [J, G, m]
            return te_pred[best, np.arange(L * H)]                                     # [G, m]

        out.append(_collect(name, idx, y, classes, _splits(len(idx), fi, seed, test_frac, folds), predict))
    return out


def joint_probe_predictions(head_cls: np.ndarray, factors: dict[str, Sequence], seed: int = 0,
                            test_frac: float = 0.25, folds: int | None = None) -> list[FactorProbe]:
    """Held-out predictions of every factor by one ridge probe on all heads at once (the
    concatenated head embeddings [n, G d]): what the heads carry together (DCI's informativeness).

    The same splits (or folds), ridge grid and validation choice as ``probe_predictions``, solved
    in the dual (kernel K = Z Z^T of the n images), so the cost grows with n^2 G d, not (G d)^3.
    Features are z-scored with the statistics of all n images (no labels are used), so one kernel
    serves every factor. Returns one ``FactorProbe`` per factor with ``pred`` [1, m].
    """
    with blas_threads(1):
        return _joint_probe_predictions(head_cls, factors, seed, test_frac, folds)


def _joint_probe_predictions(head_cls, factors, seed, test_frac, folds) -> list[FactorProbe]:
    x, _ = _check_heads(head_cls, factors, None)
    n = x.shape[0]
    z = x.astype(np.float64).reshape(n, -1)                                       # [n, G d]
    z = (z - z.mean(0)) / (z.std(0) + 1e-8)
    kernel = z @ z.T + 1.0                                                        # [n, n]; + 1: the bias column
    out = []
    for fi, (name, labels) in enumerate(factors.items()):
        idx, y, classes = _factor_labels(labels, n, name)
        onehot = np.eye(len(classes))[y]

        def predict(tr, te):
            if len(classes) == 1:
                return np.zeros((1, len(te)), dtype=np.int64)
            fit, val = split_indices(len(tr), seed + 104729 * (fi + 1), 0.2)
            f_idx, v_idx = idx[tr[fit]], idx[tr[val]]
            val_pred = _dual_ridge_predict(kernel[np.ix_(f_idx, f_idx)], kernel[np.ix_(v_idx, f_idx)],
                                           onehot[tr[fit]], [a * len(fit) for a in RIDGE_GRID])
            best = int(np.argmax([(p.argmax(1) == y[tr[val]]).mean() for p in val_pred]))
            t_idx, e_idx = idx[tr], idx[te]
            (scores,) = _dual_ridge_predict(kernel[np.ix_(t_idx, t_idx)], kernel[np.ix_(e_idx, t_idx)],
                                            onehot[tr], [RIDGE_GRID[best] * len(tr)])
            return scores.argmax(1)[None]                                             # [1, m]

        out.append(_collect(name, idx, y, classes, _splits(len(idx), fi, seed, test_frac, folds), predict))
    return out


def _dual_ridge_predict(k_fit: np.ndarray, k_cross: np.ndarray, y_fit: np.ndarray,
                        lams: Sequence[float]) -> list[np.ndarray]:
    """Ridge in the dual: scores = K_x (K + lam I)^-1 Y for each lam (the primal ridge of
    X^T X + lam I). k_fit [n, n], k_cross [m, n], y_fit [n, k] -> [m, k] per lam. One linear
    solve per lam: on a shared 2-core host a symmetric eigendecomposition of K costs 10-50x more."""
    eye = np.eye(len(k_fit))
    return [k_cross @ np.linalg.solve(k_fit + lam * eye, y_fit) for lam in lams]


def probe_matrix(head_cls: np.ndarray, factors: dict[str, Sequence], seed: int = 0,
                 layers: Sequence[int] | None = None, test_frac: float = 0.25) -> list[dict]:
    """Linear-probe accuracy of every head for every factor (``probe_predictions``, scored).

    head_cls: float [n, L', H, d]; factors: name -> n labels (None = unknown, skipped).
    seed:     seed of the train/test split (and of the validation slice that picks the ridge).
    layers:   the model layer of each of the L' slices (default 0..L'-1).
    Returns one dict per (layer, head, factor): layer, head, factor, accuracy, chance,
    n_train, n_test. accuracy and chance are both measured on the same test split.
    """
    x, layers = _check_heads(head_cls, factors, layers)
    return probe_rows(probe_predictions(x, factors, seed, layers, test_frac), layers, x.shape[2])


def probe_rows(predictions: Sequence[FactorProbe], layers: Sequence[int], heads: int) -> list[dict]:
    """``probe_predictions`` scored: one dict per (layer, head, factor) with layer, head, factor,
    accuracy, chance, n_train, n_test (head g of the predictions is layer layers[g // heads],
    head g % heads)."""
    rows = []
    for fp in predictions:
        acc = (fp.pred == fp.y[None]).mean(1)                                        # [G]
        for g in range(len(acc)):
            rows.append(dict(layer=int(layers[g // heads]), head=g % heads, factor=fp.factor,
                             accuracy=float(acc[g]), chance=fp.chance,
                             n_train=fp.n_train, n_test=int(len(fp.test))))
    return rows


class FactorVariance:
    """eta2 of MATH.md §7 accumulated batch by batch, for vectors that do not fit in memory at once
    (the neurons job's effect coordinates); `factor_variance` is one batch of it.

    add(x [m, *G, d], labels {factor: m labels, None = unknown}); eta2() -> {factor: [*G] in [0, 1]}.
    Per factor it keeps, over the images whose label is known, the count, the sum, the sum of squared
    norms and the sum per class (float64, shifted by the first batch's mean so that a large common
    offset does not cancel digits): total = sum ||x||^2 - ||sum x||^2 / n and between =
    sum_v ||sum_v x||^2 / n_v - ||sum x||^2 / n, exactly the centred sums of the definition."""

    def __init__(self):
        self._shift = None
        self._state: dict[str, dict] = {}

    def add(self, x: np.ndarray, labels: dict[str, Sequence]) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self._shift is None:
            self._shift = x.mean(0)
        x = x - self._shift
        for name, lab in labels.items():
            lab = list(lab)
            if len(lab) != len(x):
                raise ValueError(f"factor {name!r} has {len(lab)} labels for {len(x)} images")
            idx = np.array([i for i, v in enumerate(lab) if v is not None], dtype=np.int64)
            st = self._state.setdefault(name, {"n": 0, "sum": 0.0, "sq": 0.0, "classes": {}})
            if not len(idx):
                continue
            xs = x[idx]
            st["n"] += len(idx)
            st["sum"] = st["sum"] + xs.sum(0)
            st["sq"] = st["sq"] + (xs * xs).sum((0, xs.ndim - 1))
            values, inv = np.unique(np.array([str(lab[i]) for i in idx]), return_inverse=True)
            for j, v in enumerate(values):
                sel = inv.ravel() == j
                n_v, s_v = st["classes"].get(v, (0, 0.0))
                st["classes"][v] = (n_v + int(sel.sum()), s_v + xs[sel].sum(0))

    def known(self, name: str) -> int:
        """How many images with a known label of factor `name` were added."""
        return self._state.get(name, {"n": 0})["n"]

    def eta2(self) -> dict[str, np.ndarray]:
        out = {}
        for name, st in self._state.items():
            if st["n"] == 0:
                continue
            grand = (st["sum"] ** 2).sum(-1) / st["n"]                                   # [*G]
            total = st["sq"] - grand
            between = sum((s_v ** 2).sum(-1) / n_v for n_v, s_v in st["classes"].values()) - grand
            ok = total > 0
            out[name] = np.clip(np.where(ok, between / np.where(ok, total, 1.0), 0.0), 0.0, 1.0)
        return out


def factor_variance(head_cls: np.ndarray, factors: dict[str, Sequence],
                    layers: Sequence[int] | None = None) -> list[dict]:
    """eta2 of MATH.md §7 for every head and factor: the share of the head's variance that
    the factor's class means explain.

    head_cls: float [n, L', H, d]; factors: name -> n labels (None = unknown, those images
    are left out for that factor). With x_i = c_i - mean (over the images the factor knows),
    eta2 = sum_v n_v ||mean_{i: f(i)=v} x_i||^2 / sum_i ||x_i||^2, in [0, 1].
    Returns one dict per (layer, head, factor): layer, head, factor, eta2.
    """
    x = np.asarray(head_cls, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"head_cls must be [n, layers, heads, d], got shape {x.shape}")
    n, L, H, d = x.shape
    layers = list(range(L)) if layers is None else [int(v) for v in layers]
    acc = FactorVariance()
    acc.add(x, factors)
    eta = acc.eta2()
    rows = []
    for name in factors:
        if acc.known(name) < 2:
            raise ValueError(f"factor {name!r} has fewer than 2 known labels")
        for li in range(L):
            for h in range(H):
                rows.append(dict(layer=layers[li], head=h, factor=name, eta2=float(eta[name][li, h])))
    return rows


def format_matrix(rows: list[dict]) -> str:
    """A text table: one line per head (L<l>.H<h>), one column per factor, chance last."""
    factors = list(dict.fromkeys(r["factor"] for r in rows))
    heads = list(dict.fromkeys((r["layer"], r["head"]) for r in rows))
    acc = {(r["layer"], r["head"], r["factor"]): r["accuracy"] for r in rows}
    chance = {r["factor"]: r["chance"] for r in rows}
    w = max(10, max(len(f) for f in factors) + 1)
    out = ["head    " + "".join(f"{f:>{w}}" for f in factors)]
    for (l, h) in heads:
        out.append(head_name(l, h).ljust(8) + "".join(f"{acc[(l, h, f)]:>{w}.3f}" for f in factors))
    out.append("chance  " + "".join(f"{chance[f]:>{w}.3f}" for f in factors))
    return "\n".join(out)


def head_embeddings_for_scenes(lm, scenes, layers="all", batch_size: int = 256):
    """Decompose scenes with the lead's models.decompose.

    Returns (head_cls float32 [n, L', H, d], layers list[int]).
    """
    import torch
    from models import decompose
    out, lay = [], None
    for i in range(0, len(scenes), batch_size):
        x = torch.stack([lm.preprocess(s.to_pil()) for s in scenes[i:i + batch_size]])
        with torch.no_grad():
            dec = decompose(lm, x, layers=layers)
        out.append(dec.head_cls.float().cpu().numpy())
        lay = list(dec.layers)
    return np.concatenate(out), lay
