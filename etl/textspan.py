"""TextSpan (MATH.md §3), in its fast covariance form, batched over heads.

The literal algorithm works on the n x d head embeddings: at each of k steps it scores every
text by ``||C t_j||^2``, keeps the best, and removes its direction from the data and from
every text. Since ``||C t||^2 = t^T S t`` with ``S = C^T C``, the same choices follow from
the d x d covariance, and because every text lives in the top-r right singular subspace of
C (the first step of §3) all of it can be done in r coordinates:

    V      [d, r]  top-r eigenvectors of the raw Gram C^T C (= right singular vectors of C)
    S~     [r, r]  V^T S V, S = Cc^T Cc the covariance of the centred data Cc
    t~     [M, r]  T V, the texts projected and written in the basis V
    score  [M]     t~_j^T S~ t~_j = ||Cc t_j||^2, kept up to date in O(M r) per step

Per step: ``j* = argmax score``, ``u = t~_j* / ||t~_j*||``, record ``u^T S~ u / trace(S)``,
deflate ``S~ <- (I - uu^T) S~ (I - uu^T)`` and orthogonalise the texts
``t~ <- t~ - (t~ u) u^T``. The cost per head is one Gram (n d^2), one eigendecomposition
(d^3) and one projection (M d r); nothing grows with n after the Gram, nothing is n x M.

    textspan(C, T, k, r)          one head:    C [n, d]     -> idx [k], variance [k]
    textspan_heads(C, T, k, r)    many heads:  C [n, H, d]  -> idx [H, k], variance [H, k]
    textspan_literal(C, T, k, r)  the literal n x d algorithm, for the benchmark
    bench_textspan()              48 heads x k = 20, 3,500 texts, 5,000 images, d = 512

r larger than d means no projection (r = d). A chosen text is never chosen again; when no
text explains more than rounding noise of what the first one did (100 eps of the dtype),
the head has no direction left among the texts and a ValueError says so. k may exceed
neither r nor the number of texts.
Precision: the n x d and M x r work runs in C's dtype (the warehouse stores float32), the
d x d and r x r work, scores and variances in float64.
"""

from __future__ import annotations

import time

import numpy as np
import torch

__all__ = ["textspan", "textspan_heads", "textspan_literal", "check_sizes", "bench_textspan"]

EXHAUSTED_EPS = 100  # no text left when the best score < 100 eps x the best score of step 1


def _as_tensor(x, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t


def check_sizes(n: int, M: int, d: int, dT: int, k: int, r: int) -> int:
    """The r in effect, min(r, d) (r >= d keeps every direction: no projection); a ValueError
    unless n images x d, M texts x dT, k and r fit TextSpan (the message says how)."""
    if d != dT:
        raise ValueError(f"head embeddings have d = {d} but text embeddings d = {dT}; embed the texts "
                         "with the same model as the images")
    if n < 2:
        raise ValueError(f"TextSpan needs at least 2 images per head, got {n}")
    if r < 1:
        raise ValueError(f"r must be at least 1, got {r}")
    r = min(r, d)
    if not 1 <= k <= min(r, M):
        raise ValueError(f"k must be between 1 and min(r, d, number of texts) = {min(r, M)}, got {k} "
                         f"(r = {r}, {M} texts): each step removes one of the r directions")
    return r


def _textspan_chunk(C: torch.Tensor, T: torch.Tensor, k: int, r: int):
    """C [n, h, d], T [M, d] (same dtype) -> idx [h, k], var [h, k] float64, directions [h, k, d].

    Scores are kept up to date rather than recomputed: after removing u from text t
    (t' = t - a u, a = t.u) and from S (S' = (I-uu^T) S (I-uu^T)), the new score is
    t'^T S' t' = t^T S t - 2 a (t^T S u) + a^2 (u^T S u), so a step reads the texts twice
    (t.u and t.Su in one product, then the rank-one update) and never forms an [M, r] x
    [r, r] product again.
    """
    n, h, d = C.shape
    dt, f64 = C.dtype, torch.float64
    mu = C.mean(dim=0)                                                    # [h, d]
    Cc = (C - mu).transpose(0, 1)                                         # [h, n, d] centred
    S = torch.bmm(Cc.transpose(1, 2), Cc).to(f64)                         # [h, d, d] = Cc^T Cc
    del Cc
    # float64 from here on for the d x d work: the r-th and (r+1)-th eigenvalues of real
    # heads are close, and a float32 eigensolver already moves the top-r subspace enough to
    # change which texts win (measured: the literal algorithm in float32 does not).
    mu = mu.to(f64)
    G = S + n * mu.unsqueeze(2) * mu.unsqueeze(1)                         # [h, d, d] raw Gram C^T C
    V = torch.linalg.eigh(G).eigenvectors[:, :, -r:]                      # [h, d, r] top-r subspace
    total = torch.diagonal(S, dim1=1, dim2=2).sum(-1)                     # [h] ||Cc||_F^2
    St = V.transpose(1, 2) @ S @ V                                        # [h, r, r]
    del S, G
    Vd = V.to(dt)
    Tt = (T @ Vd.transpose(0, 1).reshape(d, h * r)).reshape(-1, h, r).transpose(0, 1).contiguous()  # [h, M, r]
    score = (torch.bmm(Tt, St.to(dt)) * Tt).sum(-1).to(f64)               # [h, M] ||Cc t_j||^2
    floor = EXHAUSTED_EPS * torch.finfo(dt).eps * score.amax(-1)         # [h]
    rows = torch.arange(h)
    idx = torch.empty(h, k, dtype=torch.int64)
    var = torch.empty(h, k, dtype=f64)
    U = torch.empty(h, k, r, dtype=f64)
    for step in range(k):
        j = score.argmax(-1)                                              # [h]
        best = score[rows, j]
        if (best <= floor).any():
            raise ValueError(f"after {step} texts no text explains any variance left in the head's top-{r} "
                             f"subspace (a head without variance, or texts that span too few directions); "
                             f"ask for k <= {step} or use a larger, more varied text bank")
        score[rows, j] = -torch.inf                                       # chosen: spent
        t = Tt[rows, j].to(f64)                                           # [h, r]
        u = t / t.norm(dim=-1, keepdim=True)                              # [h, r]
        su = torch.bmm(St, u.unsqueeze(2)).squeeze(2)                     # [h, r]  S~ u
        c = (u * su).sum(-1)                                              # [h]     u^T S~ u
        idx[:, step], U[:, step] = j, u
        var[:, step] = torch.where(total > 0, c / total.clamp_min(1e-300), 0.0)
        ab = torch.bmm(Tt, torch.stack([u, su], dim=2).to(dt))            # [h, M, 2]  t.u, t.S~u
        a, b = ab[..., 0].to(f64), ab[..., 1].to(f64)
        score -= 2 * a * b - a * a * c.unsqueeze(1)
        Tt.baddbmm_(ab[..., :1], u.to(dt).unsqueeze(1), alpha=-1)       # t~ <- t~ - (t~ u) u^T
        St = St - u.unsqueeze(2) * su.unsqueeze(1) - su.unsqueeze(2) * u.unsqueeze(1) \
            + c[:, None, None] * u.unsqueeze(2) * u.unsqueeze(1)         # (I-uu^T) S~ (I-uu^T)
    return idx, var, torch.bmm(U, V.transpose(1, 2))                      # directions [h, k, d]


def textspan_heads(C, T, k: int = 10, r: int = 80, *, chunk: int = 4, with_directions: bool = False):
    """TextSpan for many heads at once.

    C: [n, H, d] head embeddings (n images, H heads), T: [M, d] text embeddings (unit norm),
    numpy arrays or torch tensors, float32 or float64 (the Gram and the text products run in
    C's dtype, the eigensolver, scores and variances in float64). Heads are processed
    ``chunk`` at a time: small chunks keep the [chunk, M, r] texts in cache over the k steps.

    Returns ``idx`` int64 [H, k] (rows of T, in the order chosen) and ``variance`` float64
    [H, k] (each chosen direction's variance as a fraction of the head's total variance);
    with ``with_directions`` also ``directions`` float64 [H, k, d], the orthonormal unit
    vectors removed at each step.
    """
    C = _as_tensor(C, "C (head embeddings [n, H, d])", 3)
    T = _as_tensor(T, "T (text embeddings [M, d])", 2).to(C.dtype)
    n, H, d = C.shape
    r = check_sizes(n, T.shape[0], d, T.shape[1], k, r)
    parts = [_textspan_chunk(C[:, h0:h0 + chunk], T, k, r) for h0 in range(0, H, max(1, chunk))]
    idx, var, dirs = (torch.cat(p) for p in zip(*parts))
    out = (idx.numpy(), var.numpy())
    return out + (dirs.numpy(),) if with_directions else out


def textspan(C, T, k: int = 10, r: int = 80):
    """TextSpan for one head: C [n, d], T [M, d] -> idx int64 [k], variance float64 [k]."""
    C = _as_tensor(C, "C (head embeddings [n, d])", 2)
    idx, var = textspan_heads(C.unsqueeze(1), T, k, r)
    return idx[0], var[0]


def textspan_literal(C, T, k: int = 10, r: int = 80):
    """The literal n x d algorithm of MATH.md §3 (what the reference code does), one head.

    C [n, d], T [M, d] -> idx int64 [k], variance float64 [k]. Cost per step O(n M d); kept
    only to measure the fast form against (``bench_textspan``).
    """
    C = _as_tensor(C, "C", 2)
    T = _as_tensor(T, "T", 2).to(C.dtype)
    r = check_sizes(C.shape[0], T.shape[0], C.shape[1], T.shape[1], k, r)
    Vr = torch.linalg.svd(C, full_matrices=False).Vh[:r]                  # [r, d]
    T = T @ Vr.T @ Vr                                                     # [M, d]
    C = C - C.mean(dim=0)
    total = (C * C).sum()
    idx, var = [], []
    for _ in range(k):
        j = int(((C @ T.T) ** 2).sum(0).argmax())                         # [n, M] -> [M]
        u = T[j] / T[j].norm()
        Cu = C @ u
        idx.append(j)
        var.append(float((Cu * Cu).sum() / total))
        C = C - torch.outer(Cu, u)
        T = T - torch.outer(T @ u, u)
    return np.array(idx, dtype=np.int64), np.array(var, dtype=np.float64)


def bench_textspan(heads: int = 48, k: int = 20, texts: int = 3500, images: int = 5000, d: int = 512,
                   r: int = 80, literal_heads: int = 1, seed: int = 0) -> dict:
    """Time ``textspan_heads`` on random data of the benchmark's size (float32, as stored).

    The literal algorithm is timed on ``literal_heads`` heads and extrapolated linearly to
    ``heads`` (its cost is the same for every head); the result says so. Wall-clock and
    process CPU seconds are both reported: on a shared machine the CPU seconds are the
    steadier number (they sum over threads, so on an idle machine wall < CPU).
    """
    g = torch.Generator().manual_seed(seed)
    # low-rank head signal plus noise, like real head embeddings (a few dominant directions)
    basis = torch.randn(heads, 16, d, generator=g)
    C = torch.einsum("nhq,hqd->nhd", torch.randn(images, heads, 16, generator=g), basis)
    C += 0.3 * torch.randn(images, heads, d, generator=g)
    C = (C / C.norm(dim=-1, keepdim=True).mean() * 0.1).contiguous()      # [n, H, d] float32
    T = torch.randn(texts, d, generator=g)
    T = T / T.norm(dim=-1, keepdim=True)                                   # [M, d]
    t0, c0 = time.perf_counter(), time.process_time()
    idx, var = textspan_heads(C, T, k=k, r=r)
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for h in range(literal_heads):
        lit_idx, _ = textspan_literal(C[:, h], T, k=k, r=r)
    literal_s = (time.perf_counter() - t0) / literal_heads * heads
    literal_cpu = (time.process_time() - c0) / literal_heads * heads
    return {
        "heads": heads, "k": k, "texts": texts, "images": images, "d": d, "r": r,
        "threads": torch.get_num_threads(),
        "textspan_s": round(fast_s, 3),
        "textspan_cpu_s": round(fast_cpu, 3),
        "literal_s_extrapolated": round(literal_s, 1),
        "literal_cpu_s_extrapolated": round(literal_cpu, 1),
        "literal_heads_timed": literal_heads,
        "speedup": round(literal_s / fast_s, 1),
        "speedup_cpu": round(literal_cpu / fast_cpu, 1),
        "same_texts_as_literal": bool((lit_idx == idx[literal_heads - 1]).all()),
        "target_s": 5.0,
        "ok": fast_s <= 5.0,
    }


if __name__ == "__main__":
    import json
    print(json.dumps(bench_textspan(), indent=1))
