"""Per-neuron statistics of second-order effects over a dataset, streamed (MATH.md §10; the `neurons` job).

    acc = LayerAccumulator(gram [N, P, P], pc_images, factors=True, groups=M)
    acc.add(alpha [B, N, P], labels={factor: B values})      # batch after batch
    res = acc.finish(head_vectors)                           # -> LayerResult

alpha's last axis holds the P = K M paths of models.neurons (K later heads, each through M pool heads of
an attention-pooled tower; M = 1 otherwise), head-major. Everything is computed from alpha and the
neurons' Gram matrices G_n = U_n U_n^T; phi = alpha U is
formed only for each neuron's top images (its principal direction). The coordinates y = alpha P with
P P^T = G (P from G's eigendecomposition) have phi's Euclidean geometry (||y_a - y_b|| = ||phi_a -
phi_b||), so norms and eta2 (etl.world.probes.FactorVariance, the heads' own code) use y.

Definitions (stored in `neuron_stats`, documented in migration 008):
- norm = ||phi_n(I)||; its mean, quantiles (50, 90, 99 %) and maximum over the images;
- share_matters = the share of images where the neuron matters: the fewest images, largest norms
  first, that together hold MATTERS_SHARE (90 %) of sum_I ||phi_n(I)||^2. A neuron whose effect is
  the same size on every image scores about 0.9; a selective one (the paper: significant on < 2 % of
  images) a few %. It needs no threshold in the embedding's units, so models compare;
- top images: the images of largest norm; pc: the first right singular vector of their phi (no
  centring: the effect is approximated as a coefficient times one direction), signed so that their
  mean projection on it is positive; pc_share: the share of their sum ||phi||^2 along pc;
- head effects: mean_I ||sum_m alpha[n, (k, m)] u[n, (k, m)]|| per later head k (its M paths; for M = 1
  mean_I |alpha[n, k]| ||u[n, k]||);
- the mean effect mu_n = mean_I phi_n(I) (the 'mean' variant of the zero-shot check).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from etl.world.probes import FactorVariance

MATTERS_SHARE = 0.9
HIST_BINS = 30
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class LayerResult:
    """Per-neuron results of one layer over n images (N neurons, M top images, d embedding size).

    mean_norm, q50, q90, q99, max_norm, share_matters, hist_max [N]; hist_counts [N, HIST_BINS];
    top_index [N, M] (image positions in the order added, largest norm first), top_norm [N, M],
    top_projection [N, M] (phi . pc); pc [N, d] unit; pc_share [N]; mean_effect [N, d];
    head_effect [N, K] (K = P / groups later heads); eta2 {factor: [N]} (empty without labels); n_images."""
    n_images: int
    mean_norm: np.ndarray
    q50: np.ndarray
    q90: np.ndarray
    q99: np.ndarray
    max_norm: np.ndarray
    share_matters: np.ndarray
    hist_max: np.ndarray
    hist_counts: np.ndarray
    top_index: np.ndarray
    top_norm: np.ndarray
    top_projection: np.ndarray
    pc: np.ndarray
    pc_share: np.ndarray
    mean_effect: np.ndarray
    head_effect: np.ndarray
    eta2: dict


def coordinates_basis(gram: np.ndarray) -> np.ndarray:
    """P [N, K, K] with P_n P_n^T = G_n (G: [N, K, K], symmetric PSD): y = alpha_n @ P_n has
    ||y|| = ||phi_n|| and the geometry of phi_n."""
    evals, evecs = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    return evecs * np.sqrt(np.clip(evals, 0.0, None))[:, None, :]


def share_matters(norms: np.ndarray, share: float = MATTERS_SHARE) -> np.ndarray:
    """norms [n, N] -> [N]: the fewest images (largest norms first) holding `share` of sum ||phi||^2,
    as a share of n (0 for a neuron with no effect at all)."""
    sq = np.sort(np.asarray(norms, dtype=np.float64) ** 2, axis=0)[::-1]           # [n, N], largest first
    total = sq.sum(0)
    count = (np.cumsum(sq, axis=0) < share * total[None, :] * (1 - 1e-12)).sum(0) + 1
    return np.where(total > 0, count / len(sq), 0.0)


def histograms(norms: np.ndarray, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """norms [n, N] -> (hist_max [N], counts [N, bins]): equal bins over [0, max] per neuron."""
    norms = np.asarray(norms, dtype=np.float64)
    n, N = norms.shape
    top = norms.max(0)
    scaled = norms / np.where(top > 0, top, 1.0)[None, :]
    b = np.minimum((scaled * bins).astype(np.int64), bins - 1)                        # [n, N]
    counts = np.bincount((b + bins * np.arange(N)[None, :]).ravel(), minlength=N * bins).reshape(N, bins)
    return top, counts


class LayerAccumulator:
    """Streams alpha [B, N, P] batches of one MLP layer (P = K heads x `groups` pool heads) and keeps
    what the summaries need: every image's norms [n, N] (float32), the running sums of alpha and of
    each head's effect norm, the top `pc_images` images' alpha per neuron, and (with factor labels)
    the eta2 sums."""

    def __init__(self, gram: np.ndarray, pc_images: int = 100, factors: bool = False, groups: int = 1):
        gram = np.asarray(gram, dtype=np.float64)
        self.N, self.K = gram.shape[:2]                                                # K: here the P paths
        if self.K % groups:
            raise ValueError(f"{self.K} paths do not split into heads of {groups} pool heads")
        self.groups = int(groups)
        self.P = coordinates_basis(gram).astype(np.float32)                           # [N, P, P]
        H = self.K // self.groups
        blocks = gram.reshape(self.N, H, self.groups, H, self.groups)
        self.head_gram = np.einsum("nhmhj->nhmj", blocks).astype(np.float32)          # [N, K, M, M] per head
        self.M = int(pc_images)
        self.n = 0
        self.norms: list[np.ndarray] = []
        self.sum_alpha = np.zeros((self.N, self.K))
        self.head_norm = np.zeros((self.N, self.K // self.groups))
        self.top_val = np.zeros((self.N, 0), np.float32)
        self.top_idx = np.zeros((self.N, 0), np.int64)
        self.top_alpha = np.zeros((self.N, 0, self.K), np.float32)
        self.fv = FactorVariance() if factors else None

    def add(self, alpha: np.ndarray, labels: Optional[dict] = None) -> np.ndarray:
        """Fold in a batch alpha [B, N, P] (labels: {factor: B values} when factors=True); returns its norms [B, N]."""
        alpha = np.asarray(alpha, dtype=np.float32)
        B = len(alpha)
        y = np.einsum("bnk,nkj->bnj", alpha, self.P)                                     # [B, N, K]
        norms = np.sqrt((y.astype(np.float64) ** 2).sum(-1))                             # [B, N]
        self.norms.append(norms.astype(np.float32))
        self.sum_alpha += alpha.sum(0, dtype=np.float64)
        a = alpha.reshape(B, self.N, -1, self.groups)                                     # [B, N, K, M]
        sq = np.einsum("bnkm,nkmj,bnkj->bnk", a, self.head_gram, a)
        self.head_norm += np.sqrt(np.clip(sq, 0.0, None)).sum(0, dtype=np.float64)
        val = np.concatenate([self.top_val, norms.T.astype(np.float32)], 1)               # [N, M + B]
        idx = np.concatenate([self.top_idx, np.broadcast_to(np.arange(self.n, self.n + B), (self.N, B))], 1)
        al = np.concatenate([self.top_alpha, alpha.transpose(1, 0, 2)], 1)                # [N, M + B, K]
        if val.shape[1] > self.M:
            keep = np.argpartition(-val, self.M - 1, axis=1)[:, :self.M]                  # [N, M]
            val = np.take_along_axis(val, keep, 1)
            idx = np.take_along_axis(idx, keep, 1)
            al = np.take_along_axis(al, keep[:, :, None], 1)
        self.top_val, self.top_idx, self.top_alpha = val, idx, al
        if self.fv is not None:
            self.fv.add(y, labels or {})
        self.n += B
        return norms

    def finish(self, head_vectors: Callable[[slice], np.ndarray], chunk: int = 256) -> LayerResult:
        """The per-neuron summaries; head_vectors(slice of neurons) -> U [c, P, d] (the lens's)."""
        if self.n == 0:
            raise ValueError("no image was added: the layer has no statistics")
        norms = np.concatenate(self.norms)                                                # [n, N]
        q = np.quantile(norms, QUANTILES, axis=0)                                         # [3, N]
        hist_max, hist_counts = histograms(norms)
        order = np.argsort(-self.top_val, axis=1, kind="stable")
        top_val = np.take_along_axis(self.top_val, order, 1)
        top_idx = np.take_along_axis(self.top_idx, order, 1)
        top_alpha = np.take_along_axis(self.top_alpha, order[:, :, None], 1)             # [N, M, K]
        mean_alpha = self.sum_alpha / self.n
        pcs, shares, projs, means = [], [], [], []
        for a in range(0, self.N, chunk):
            A = top_alpha[a:a + chunk].astype(np.float64)                                # [c, M, K]
            # phi = A U and y = A P have the same singular values and left singular vectors (phi = y V^T,
            # V with orthonormal columns), so the SVD runs on [M, K], not [M, d]
            uy, s, _ = np.linalg.svd(np.einsum("cmk,ckj->cmj", A, self.P[a:a + chunk].astype(np.float64)),
                                     full_matrices=False)                               # uy [c, M, r], s [c, r]
            U = np.asarray(head_vectors(slice(a, a + chunk)), dtype=np.float64)          # [c, K, d]
            s1 = np.where(s[:, 0] > 0, s[:, 0], 1.0)
            pc = np.einsum("cm,cmk,ckd->cd", uy[:, :, 0], A, U) / s1[:, None]             # phi^T u1 / s1, unit
            proj = uy[:, :, 0] * s[:, :1]                                                 # phi . pc  [c, M]
            sign = np.where(proj.mean(1) < 0, -1.0, 1.0)
            pcs.append(pc * sign[:, None])
            projs.append(proj * sign[:, None])
            energy = (s ** 2).sum(1)
            shares.append(np.where(energy > 0, s[:, 0] ** 2 / np.where(energy > 0, energy, 1.0), 0.0))
            means.append(np.einsum("ck,ckd->cd", mean_alpha[a:a + chunk], U))
        eta2 = self.fv.eta2() if self.fv is not None else {}
        return LayerResult(
            n_images=self.n, mean_norm=norms.mean(0, dtype=np.float64), q50=q[0], q90=q[1], q99=q[2],
            max_norm=norms.max(0).astype(np.float64), share_matters=share_matters(norms),
            hist_max=hist_max, hist_counts=hist_counts, top_index=top_idx, top_norm=top_val.astype(np.float64),
            top_projection=np.concatenate(projs), pc=np.concatenate(pcs), pc_share=np.concatenate(shares),
            mean_effect=np.concatenate(means), head_effect=self.head_norm / self.n, eta2=eta2)
