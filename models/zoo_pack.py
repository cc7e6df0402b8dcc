"""Lossless packing of the toy zoo's weights: the rows training never touched are rebuilt from the seed.

Most of a toy's weights file is its text tower's token embedding, [49408, 128] (12.6 MB of a
14.6-19.2 MB float16 file), and training on the shapes world updates only the ~80 rows of the
tokens its captions use. AdamW gives a row that never had a gradient exactly this: its initial
value times `(1 - lr_t * wd)` at every step t (the moments stay zero, so the Adam step adds 0).
So such a row is a function of the seed and the schedule, and a packed file stores

    <key>.rows    int64 [k]         the rows that differ from the rebuild (bit for bit)
    <key>.values  float16 [k, ...]  their trained values

plus, in the safetensors metadata, `atlas_pack` (this format's name), the seed, and per packed
key the multipliers of every phase (float64, one per optimiser step) and the sha256 of the full
float16 tensor. Unpacking draws the seeded random init of the same architecture (what
`load_model(arch, random_init=True, seed=seed)` builds), multiplies each phase's decay in float32
exactly as torch's AdamW does (`param.mul_(1 - lr * wd)`), rounds to float16 at the end of every
phase (each phase of the recipe is saved as float16 and the next starts from that file), puts the
stored rows back, and checks the sha256: a library whose init draws differently fails loudly
instead of loading other weights.

    pack_state(state, init, phases, seed) -> (tensors, metadata)    # for save_file
    is_packed(metadata) -> bool
    unpack_state(tensors, metadata, init_state) -> state            # the full float16 state dict
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

FORMAT = "atlas-zoo-pack-1"
MIN_ELEMENTS = 1 << 20          # pack only tensors this large (the token embedding)
ROWS, VALUES = ".rows", ".values"


class PackError(ValueError):
    """A packed file cannot be rebuilt exactly; the message says why and what to do."""


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def rebuild(init: torch.Tensor, phases: Sequence[Sequence[float]]) -> torch.Tensor:
    """The float16 tensor a never-updated parameter ends at. init: the float32 initial value [*];
    phases: per phase, the decay multiplier of each step. Returns float16 [*]."""
    t = init.detach().float().cpu().numpy().copy()
    factors = [np.asarray(p, dtype=np.float64).astype(np.float32) for p in phases]
    for chunk in np.array_split(t.reshape(len(t), -1), max(1, t.nbytes >> 20)):   # ~1 MB at a time stays in cache
        for phase in factors:
            for c in phase:     # AdamW's decoupled decay: param * float32(1 - lr * wd), one IEEE float32 product
                np.multiply(chunk, c, out=chunk)
            chunk[...] = chunk.astype(np.float16)    # each phase is saved as float16, the next starts from it
    return torch.from_numpy(t).half()


def pack_state(state: Mapping[str, torch.Tensor], init: Mapping[str, torch.Tensor],
               phases: Sequence[Sequence[float]], seed: int, min_elements: int = MIN_ELEMENTS) -> tuple[dict, dict]:
    """Split the float16 ``state`` into what must be stored. init: the seeded random init's state
    (float32); phases: per phase, the decay multipliers. Packs each large 2-D tensor whose rows
    mostly rebuild; returns (tensors, metadata) for safetensors."""
    tensors, keys = {}, {}
    for k, v in state.items():
        if v.ndim == 2 and v.numel() >= min_elements and k in init and v.dtype == torch.float16:
            guess = rebuild(init[k], phases)                                   # [rows, cols] float16
            differ = (guess.view(torch.int16) != v.view(torch.int16)).any(1)   # bitwise, [rows]
            if int(differ.sum()) < 0.5 * len(v):
                rows = differ.nonzero()[:, 0]
                tensors[k + ROWS] = rows.to(torch.int64).contiguous()
                tensors[k + VALUES] = v[rows].contiguous()
                keys[k] = _sha(v)
                continue
        tensors[k] = v.contiguous()
    meta = {"atlas_pack": FORMAT, "atlas_pack_seed": str(int(seed)),
            "atlas_pack_keys": json.dumps(keys), "atlas_pack_phases": json.dumps([list(map(float, p)) for p in phases])}
    return tensors, meta


def is_packed(metadata: Mapping[str, str] | None) -> bool:
    return bool(metadata) and metadata.get("atlas_pack") is not None


def pack_seed(metadata: Mapping[str, str]) -> int:
    return int(metadata["atlas_pack_seed"])


def unpack_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 init_state: Callable[[int], Mapping[str, torch.Tensor]], source: str = "") -> dict:
    """The full state dict of a packed file. init_state(seed) gives the seeded random init's
    state dict (float32). Raises PackError when the format is unknown or a rebuilt tensor's
    sha256 differs from the one recorded."""
    if metadata.get("atlas_pack") != FORMAT:
        raise PackError(f"{source}: packed with '{metadata.get('atlas_pack')}', this version reads '{FORMAT}'; "
                        "update CLIP Atlas or use a full weights file")
    keys = json.loads(metadata["atlas_pack_keys"])
    phases = json.loads(metadata["atlas_pack_phases"])
    state = {k: v for k, v in tensors.items() if not (k.endswith(ROWS) or k.endswith(VALUES))}
    init = init_state(pack_seed(metadata)) if keys else {}
    for k, sha in keys.items():
        t = rebuild(init[k], phases)
        rows = tensors[k + ROWS]
        t[rows] = tensors[k + VALUES]
        if _sha(t) != sha:
            raise PackError(
                f"{source}: '{k}' does not rebuild exactly from seed {pack_seed(metadata)} (sha256 differs): this "
                "torch/open_clip draws a different random init than the one the file was packed with "
                "(torch 2.14.1, open_clip_torch 3.3.0); install the pinned versions from requirements.txt")
        state[k] = t
    return state
