"""One rank of a 2-rank Gloo launch (see launch.py) training with a framework: Lightning,
Accelerate or the Hugging Face Trainer, the lossy hook registered through
lossy_hooks.integrations. Usage: integrations_worker.py OUT.json SCENARIO"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossy_hooks import LossyState, lossy_allreduce_hook

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import run_scenarios
except ImportError:
    from tests.launch import run_scenarios

LOSS, MTU = 0.2, 64  # 16 fp32 elements a packet: hundreds of packets a step


def data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def summary(state: LossyState) -> dict:
    st = state.stats()
    return {"sent": st["worker"]["packets_sent"], "lost": st["worker"]["packets_lost"], "steps": state.steps}


def lightning() -> dict:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lossy_hooks.integrations.lightning import LossyHookCallback

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    quiet = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    state = LossyState(loss_rate=LOSS, mtu=MTU, seed=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12,
        accumulate_grad_batches=2,
        callbacks=[LossyHookCallback(state)],
        **quiet,
    )
    trainer.fit(Lit(), DataLoader(data(), batch_size=2))
    out = summary(state) | {"optimizer_steps": trainer.global_step}
    # Lightning's documented way: on CPU it registers nothing; the state says so
    silent = LossyState(loss_rate=LOSS, mtu=MTU)
    strategy = DDPStrategy(ddp_comm_state=silent, ddp_comm_hook=lossy_allreduce_hook)
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, **quiet).fit(
        Lit(), DataLoader(data(), batch_size=2)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = silent.stats()
    out["silent"] = {
        "sent": st["worker"]["packets_sent"],
        "hook_reached": st["hook_reached"],
        "warned": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }
    return out


def accelerate() -> dict:
    from accelerate import Accelerator

    from lossy_hooks.integrations.accelerate import check, register

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = acc.prepare(model, opt, DataLoader(data(), batch_size=2))
    state = LossyState(loss_rate=LOSS, mtu=MTU, seed=5)
    register(model, state)
    micro = 0
    for x, y in loader:
        with acc.accumulate(model):
            acc.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        micro += 1
        if micro == 2:
            check(state)
    return summary(state) | {"micro_batches": micro, "wrapped": type(model).__name__}


def hf_trainer() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from lossy_hooks.integrations.hf_trainer import register

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=6,
            use_cpu=True,
            ddp_backend="gloo",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        state = LossyState(loss_rate=LOSS, mtu=MTU, seed=7)
        register(trainer, state)
        trainer.train()
    return summary(state) | {"optimizer_steps": trainer.state.global_step}


SCENARIOS = {f.__name__: f for f in (lightning, accelerate, hf_trainer)}


def main() -> None:
    out, *names = sys.argv[1:]
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_scenarios(SCENARIOS, names, out)
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
