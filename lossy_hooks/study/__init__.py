"""The study application: the training loop (``torchrun -m lossy_hooks.study.train``, the
``lossy-train`` console script, ``train_ddp.py``), its command line, run folders and their
readers, figures, the console, how a model is parallelised, the workloads (datasets,
torchvision models, the GPT, text corpora), and grids of configurations planned and launched
(:mod:`lossy_hooks.study.sweeping`, which the tools and the experiments use). Built on the
library, never imported by it; it imports no tool and no experiment.
"""
