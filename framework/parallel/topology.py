"""One validated topology object, passed explicitly: world = pp x dp x tp.

Ranks are laid out with tp fastest, then dp, then pp, the same mesh DeepSpeed builds for AutoTP, so the
ranks of one tensor-parallel group are neighbours (one node, fast links).
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.cli import UserError
from framework.weights.layout import check_stage_count


@dataclass(frozen=True)
class Topology:
    world_size: int
    tp: int = 1
    pp: int = 1
    rank: int = 0

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"world={self.world_size} (pp={self.pp} x dp={self.dp} x tp={self.tp})"


def build_topology(world_size: int, rank: int, tp: int = 1, pp: int = 1, n_heads: int | None = None,
                   n_kv_heads: int | None = None, ffn_dim: int | None = None, n_layers: int | None = None,
                   key: str = "parallel.tp") -> Topology:
    """Validate the layout against the world and the model; raise UserError naming the fix (``key`` names the
    tp setting in the messages: parallel.tp for training, infer.tp for inference)."""
    if tp < 1 or pp < 1:
        raise UserError(f"parallel sizes must be >= 1 (got tp={tp}, pp={pp})")
    if world_size % (tp * pp) != 0:
        raise UserError(
            f"world size {world_size} is not divisible by tp*pp={tp * pp}: launch a multiple of {tp * pp} "
            f"processes or change parallel.tp"
        )
    if n_heads is not None and n_heads % tp != 0:
        raise UserError(f"{key}={tp} does not divide the {n_heads} attention heads: pick a divisor of {n_heads}")
    if n_kv_heads is not None and n_kv_heads % tp != 0:
        raise UserError(
            f"{key}={tp} does not divide the {n_kv_heads} key-value heads: pick a divisor of {n_kv_heads}"
        )
    if ffn_dim is not None and ffn_dim % tp != 0:
        raise UserError(f"{key}={tp} does not divide the MLP size {ffn_dim}: pick a divisor of {ffn_dim}")
    if n_layers is not None:
        check_stage_count(pp, n_layers)
    return Topology(world_size=world_size, tp=tp, pp=pp, rank=rank)
