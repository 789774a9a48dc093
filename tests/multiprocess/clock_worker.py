"""One rank of a Gloo launch (see launch.py): the deadline loss model and the simulated clock
inside real DDP. Rank r's gradient is 2^r in every element (a Probe), so with zero fill and
a sum every delivered packet says whose copies arrived. Usage: clock_worker.py OUT.json deadline"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks import LossyState, lossy_allreduce_hook
from lossy_hooks.core.network import NetworkModel

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from hook_worker import Probe, probe_step
    from launch import worker_main
except ImportError:
    from tests.launch import worker_main
    from tests.multiprocess.hook_worker import Probe, probe_step

SIZE, MTU, STEPS = 20_000, 400, 60  # one bucket of 200 packets of 100 fp32 elements
SHORT = 20_050  # 201 packets, the last of 50 elements
NETWORK = NetworkModel(bandwidth_gbps=10, latency_us=5, jitter="lognormal 4 1")


def run(size: int = SIZE, **kw: Any) -> tuple[LossyState, list[list[float]]]:
    state = LossyState(loss_model="deadline 1.2x", network=NETWORK, mtu=MTU, seed=3, **kw)
    ddp = DDP(Probe([size]), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    with state.passthrough():  # DDP's first iteration and its bucket rebuild, uncounted
        probe_step(ddp, 1.0)
    values = []
    for _ in range(STEPS):
        g = probe_step(ddp, float(2 ** dist.get_rank()))[0]
        values.append(g[:: MTU // 4].tolist())  # one value per packet (the first element)
    return state, values


def deadline() -> dict[str, Any]:
    out: dict[str, Any] = {}
    state, values = run(fill="zero", reduction="sum")
    st = state.stats(all_ranks=True)["worker"]
    out["zero"] = {"values": values, "sent": st["packets_sent"], "lost": st["packets_lost"]}
    out["clock"] = state.clock.read()
    out["keep"] = state.worker.model.bucket_keep_fraction(SIZE // (MTU // 4), 4 * SIZE)
    state, values = run(fill="rescale", counts_transport="regenerate")
    out["rescale"] = {"values": values, "clock": state.clock.read()}
    # post rescale of a bucket whose last packet is short (201 packets, the last of 50
    # elements): survivors divided by the keep fraction of the bytes the clock prices
    state, values = run(SHORT, drop_point="post", fill="rescale", reduction="sum")
    st = state.stats()["post"]
    out["short"] = {"values": values, "sent": st["packets_sent"], "lost": st["packets_lost"]}
    return out


if __name__ == "__main__":
    worker_main({"deadline": deadline})
