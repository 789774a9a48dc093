"""The loss machinery behind the DDP hook and the FSDP2 collectives: the hook's state and
its options, packets and buckets, the random streams, techniques (encodings, protection),
the packet ledger, the simulated network, and the statistics the tests and tools use.

Nothing here imports torchvision, matplotlib or rich: ``import lossy_hooks`` stays light.
"""
