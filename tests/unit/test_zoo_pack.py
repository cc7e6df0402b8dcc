"""The zoo's lossless packing (models/zoo_pack.py): rows training never touched are rebuilt from the
seed, bit for bit, and a rebuild that differs is refused."""
from __future__ import annotations

import pytest
import torch

from models import zoo_pack


def _phases(seed: int = 0) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return [(1 - 1e-4 * torch.rand(30, generator=g, dtype=torch.float64)).tolist(),
            (1 - 1e-4 * torch.rand(20, generator=g, dtype=torch.float64)).tolist()]


def _trained(init: torch.Tensor, phases, touched: list[int]) -> torch.Tensor:
    """What training leaves: decayed rows, plus rows a gradient changed."""
    t = zoo_pack.rebuild(init, phases).clone()
    t[touched] = torch.randn(len(touched), t.shape[1]).half()
    return t


def test_pack_stores_only_the_touched_rows_and_unpacks_bit_for_bit():
    torch.manual_seed(0)
    init = {"emb": torch.randn(512, 16) * 0.02, "small": torch.randn(4, 4)}
    phases = _phases()
    state = {"emb": _trained(init["emb"], phases, [3, 77, 500]), "small": init["small"].half()}
    tensors, meta = zoo_pack.pack_state(state, init, phases, seed=5, min_elements=1000)
    assert tensors["emb.rows"].tolist() == [3, 77, 500] and tensors["emb.values"].shape == (3, 16)
    assert "emb" not in tensors and torch.equal(tensors["small"], state["small"])
    assert zoo_pack.is_packed(meta) and zoo_pack.pack_seed(meta) == 5
    seeds = []
    back = zoo_pack.unpack_state(tensors, meta, lambda s: seeds.append(s) or init)
    assert seeds == [5] and back.keys() == state.keys()
    assert all(torch.equal(back[k].view(torch.int16), state[k].view(torch.int16)) for k in state)


def test_a_rebuild_from_another_init_is_refused():
    torch.manual_seed(1)
    init = {"emb": torch.randn(512, 16) * 0.02}
    phases = _phases()
    tensors, meta = zoo_pack.pack_state({"emb": _trained(init["emb"], phases, [1])}, init, phases, seed=0,
                                        min_elements=1000)
    other = {"emb": init["emb"] + 1e-3}
    with pytest.raises(zoo_pack.PackError, match="does not rebuild exactly from seed 0"):
        zoo_pack.unpack_state(tensors, meta, lambda s: other, source="x.safetensors")


def test_a_tensor_most_of_whose_rows_changed_is_stored_whole():
    torch.manual_seed(2)
    init = {"emb": torch.randn(64, 32)}
    state = {"emb": torch.randn(64, 32).half()}
    tensors, _ = zoo_pack.pack_state(state, init, _phases(), seed=0, min_elements=100)
    assert set(tensors) == {"emb"}


def test_rebuild_is_what_adamw_does_to_a_row_without_gradient():
    """The recipe's schedule through torch's own AdamW (zero gradients: the moments stay 0, so only
    the decoupled decay acts) ends where rebuild of recipe_decay ends, bit for bit."""
    from etl.world.recipe import RECIPE_PHASES, TrainConfig, lr_at, recipe_decay
    n = 60                                            # the warm-up and the start of the cosine
    phases = [p[:n] for p in recipe_decay("toy-shapes-small", 0)]
    torch.manual_seed(3)
    init = torch.randn(256, 8) * 0.02
    p = torch.nn.Parameter(init.clone())
    for _, flags in RECIPE_PHASES:
        cfg = TrainConfig(**flags)
        opt = torch.optim.AdamW([p], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=cfg.weight_decay)
        for step in range(n):
            opt.param_groups[0]["lr"] = lr_at(step, cfg.steps, cfg.lr, max(1, int(cfg.warmup * cfg.steps)))
            p.grad = torch.zeros_like(p)
            opt.step()
        with torch.no_grad():
            p.copy_(p.half().float())                 # each phase is saved as float16
    assert torch.equal(p.detach().half().view(torch.int16), zoo_pack.rebuild(init, phases).view(torch.int16))
    assert not torch.equal(init.half(), zoo_pack.rebuild(init, phases))
