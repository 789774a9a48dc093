"""The tools: command lines over the study application, each run as
``python -m lossy_hooks.tools.<tool>``: a grid of runs (:mod:`.sweep`), tables and figures over
runs (:mod:`.compare`), DDP's buckets and FSDP2's shard rows of a model in packets
(:mod:`.bucket_layout`). A tool imports the library and :mod:`lossy_hooks.study`, never an
experiment.
"""
