"""Which layers a job analyses: the `--layers` spelling -> 0-based layer indices. Pure Python (no
torch), so the pipeline can decide from the warehouse alone whether a model has anything left to do."""
from __future__ import annotations

from typing import Sequence, Union

LayerSpec = Union[str, Sequence[int]]

AUTO_ALL_LAYERS = 12     # 'auto' analyses every layer of a model this deep or shallower


def resolve_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """'auto' | 'last4' | 'all' | 'lastN' | '8,9,10,11' | [8, 9] -> sorted unique 0-based layers.

    'auto' (the jobs' default): every layer when the model has at most AUTO_ALL_LAYERS layers
    (the toy zoo, ViT-B), the last 4 above (ViT-L/H/g, where the direct effects concentrate).
    """
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "auto":
            s = "all" if n_layers <= AUTO_ALL_LAYERS else "last4"
        if s == "all":
            return list(range(n_layers))
        if s.startswith("last") and s[4:].isdigit():
            n = int(s[4:])
            if not 1 <= n <= n_layers:
                raise ValueError(f"--layers {spec}: the model has {n_layers} layers")
            return list(range(n_layers - n, n_layers))
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--layers '{spec}': use auto, last4, all, or comma-separated 0-based indices like 8,9,10,11") from None
    layers = sorted(set(int(i) for i in spec))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if not layers or bad:
        raise ValueError(f"--layers {spec}: layers must be in 0..{n_layers - 1} (0-based)")
    return layers
