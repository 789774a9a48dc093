"""Today's placement: one hop each way around the backend's opaque allreduce."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lossy_hooks.core.placement.base import LossSite, Phase, Placement

if TYPE_CHECKING:
    from lossy_hooks.core.network import NetworkModel
    from lossy_hooks.core.options import LossConfig

__all__ = ["ParameterServer"]


class ParameterServer(Placement):
    """One hop each way around an opaque allreduce: site ``worker`` (each rank's uplink,
    reduce phase) and site ``post`` (each rank's downlink, broadcast phase); priced as the
    ring allreduce ``2 (W - 1) (α + B / (W β))``."""

    name = "ps"
    SITES = (LossSite("worker", "reduce", 1), LossSite("post", "broadcast", 1))

    def all_sites(self) -> tuple[LossSite, ...]:
        return self.SITES

    def refuses(self, config: LossConfig) -> str | None:
        for name in ("ranks_per_node", "link_loss"):
            if getattr(config, name) is not None:
                return (
                    f"{name} needs a per-hop algorithm (ring, tree, dbtree, direct): "
                    "algorithm='ps' has no links between ranks"
                )
        return None

    def expected_delivered(self, world: int, loss_rate: float, phase: Phase) -> float:
        """``1 - p``: every copy crosses one lossy hop, in either phase."""
        return 1.0 - loss_rate

    def lossfree_seconds(
        self, network: NetworkModel, nbytes: float, world: int, packets: int | None = None
    ) -> float:
        return network.ring_seconds(nbytes, world)

    # the collective itself is the backend's own (NCCL, Gloo): loss happens only at the sites
    def all_reduce(self, tensor: torch.Tensor, group: Any) -> torch.futures.Future:
        return dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: Any, group: Any) -> None:
        dist.reduce_scatter_single(output=output, input=input, op=op, group=group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: Any) -> None:
        dist.all_gather_single(output, input, group=group)
