"""The packet pipeline: what every lossy collective does to a flat buffer (packetize, draw
the masks, the technique chain, the real collective, the fill, the counts), one module per
family of collective. The adapters (the DDP hook, the FSDP collectives, the lossy process
group) only say which buffer, which record and which collective.

- :mod:`.allreduce`: all-reduce (the DDP hook's bucket, the group's ``all_reduce``);
- :mod:`.sharded`: reduce-scatter and all-gather of ``W`` rows (FSDP's, the group's);
- :mod:`.delivery`: what travels from one rank to another and is not reduced (the group's
  all-to-all, broadcast, point-to-point and list all-gather): a lost packet is zero or stale
  at its receiver.
"""

from lossy_hooks.core.pipeline.allreduce import all_reduce, join, plain_all_reduce

__all__ = ["all_reduce", "join", "plain_all_reduce"]
