"""lossy_hooks: simulate packet loss in the communication of distributed training.

Two lines in existing DDP code::

    state = LossyState(loss_rate=0.05, mtu=1500, drop_point="worker", fill="rescale")
    ddp_model.register_comm_hook(state, lossy_allreduce_hook)

or, for any parallelism, a process group whose data collectives lose packets::

    pg = lossy_group(LossyState(loss_rate=0.01, fill="zero"), kinds=("p2p", "all_to_all"))
"""

from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.process_group import reliable
from lossy_hooks.group import lossy_group, lossy_subgroups
from lossy_hooks.hook import LossyState, lossy_allreduce_hook
from lossy_hooks.loss_models import (
    Bernoulli,
    ExactCount,
    GilbertElliott,
    LossModel,
    MarkovFourState,
    TailDrop,
    Trace,
    parse_loss_model,
)

__version__ = "0.1.0"

__all__ = [
    "Bernoulli",
    "ExactCount",
    "GilbertElliott",
    "LossModel",
    "LossyState",
    "MarkovFourState",
    "PacketLayout",
    "TailDrop",
    "Trace",
    "__version__",
    "lossy_allreduce_hook",
    "lossy_group",
    "lossy_subgroups",
    "parse_loss_model",
    "reliable",
]
