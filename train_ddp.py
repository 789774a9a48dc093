"""The packet-loss study script: ``lossy_hooks.study.train`` (see its docstring and
docs/reference.md for every flag). Launch with torchrun, or plainly with python for one process:

    torchrun --nproc_per_node=4 train_ddp.py --loss_rate 0.05 --mtu 1500 --worker_drop --use_avg
    python train_ddp.py --max_steps 50
"""

from lossy_hooks.study.train import main

if __name__ == "__main__":
    raise SystemExit(main())
