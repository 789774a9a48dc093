"""The study application: the training loop (``torchrun -m lossy_hooks.study.train``, the
``lossy-train`` console script, ``train_ddp.py``), its command line, run folders and their
readers, figures, the console, how a model is parallelised, and the workloads (datasets,
torchvision models, the GPT, text corpora). Built on the library, never imported by it.
"""
