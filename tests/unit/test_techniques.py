"""The technique interface (core/techniques): the chain a configuration gets, the refusals
that come from each technique, the counters each one adds, and that a technique added by
registration alone runs in the real hook (one-process DDP), in order, on what travels."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from lossy_hooks import LossyState, lossy_allreduce_hook
from lossy_hooks.core import techniques
from lossy_hooks.core.options import LossConfig
from lossy_hooks.core.process_group import single_process_group
from lossy_hooks.core.techniques import FILLS, TECHNIQUES, BucketCall, Protection, Technique
from lossy_hooks.loss_models import Bernoulli, parse_loss_model


def chain_names(**settings) -> list[str]:
    return [t.name for t in LossyState(**settings).techniques]


def test_each_configuration_gets_its_chain_in_order():
    assert chain_names(loss_rate=0.1) == ["rescale", "wire_dtype"]
    assert chain_names(loss_rate=0.1, fill="zero", error_feedback=True, measure_fidelity=True) == [
        "measure_fidelity",
        "error_feedback",
        "zero",
        "wire_dtype",
    ]
    assert chain_names(loss_rate=0.1, encoding="hadamard", wire_dtype="bf16") == [
        "hadamard",
        "rescale",
        "wire_dtype",
    ]
    stale = LossyState(loss_rate=0.1, fill="stale", drop_point="post")
    assert stale.fill_technique is stale.techniques[0] and stale.fill_technique.keeps_stale
    assert [cls.name for cls in FILLS.values()] == ["zero", "rescale", "stale"]


@pytest.mark.parametrize(
    ("settings", "technique"),
    [
        ({"fill": "stale", "drop_point": "worker"}, "stale"),
        ({"loss_rate": 1.0, "drop_point": "post"}, "rescale"),
        ({"encoding": "hadamard", "packetization": "tensor"}, "hadamard"),
        ({"encoding": "hadamard", "fill": "stale", "drop_point": "post"}, "hadamard"),
        ({"error_feedback": True, "drop_point": "post", "fill": "zero"}, "error_feedback"),
        ({"error_feedback": True}, "error_feedback"),
        ({"error_feedback": True, "fill": "zero", "encoding": "hadamard"}, "error_feedback"),
        ({"loss_model": "gemodel 5% 30%", "drop_point": "post", "retransmit": 1}, "protection"),
    ],
)
def test_a_refused_combination_raises_the_reason_of_the_technique_that_refuses_it(settings, technique):
    """The ValueError is the refusing technique's own reason (one home per rule), asked of the
    class on a stand-in of the refused settings."""
    cls = next(c for c in TECHNIQUES if c.name == technique)
    with pytest.raises(ValueError) as raised:
        LossyState(**settings)
    config = stand_in(settings)
    assert cls.used_by(config)
    assert str(raised.value) == cls.refuses(config)


def stand_in(settings: dict) -> SimpleNamespace:
    """The attributes a technique reads, for settings no LossConfig can hold."""
    rest = dict(settings)
    rate, spec = rest.pop("loss_rate", 0.0), rest.pop("loss_model", None)
    model = parse_loss_model(spec) if spec is not None else Bernoulli(rate)
    values = {f.name: getattr(LossConfig(), f.name) for f in dataclasses.fields(LossConfig)} | rest
    drop = values["drop_point"]
    values |= {
        "loss_model": model,
        "post_keep_rate": 1.0 - model.long_run_loss_rate(),
        "protection": Protection(values["retransmit"], values["fec"]),
        "drops_before": drop in ("worker", "both"),
        "drops_after": drop in ("post", "both"),
        "protecting": values["retransmit"] > 0 or values["fec"] is not None or values["protect"] is not None,
    }
    return SimpleNamespace(**values)


def test_the_deadline_model_refuses_through_its_own_method():
    with pytest.raises(ValueError, match="needs network=NetworkModel") as raised:
        LossyState(loss_model="deadline 2x")
    model = LossyState(loss_rate=0.0).loss_model
    assert model.refuses(LossConfig()) is None
    assert "deadline" in str(raised.value)


def one_step(state: LossyState, seed: int = 0) -> torch.Tensor:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.Linear(40, 3))
    ddp = DDP(model)
    state.name_parameters(model)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    ddp(torch.randn(5, 300, generator=torch.Generator().manual_seed(seed))).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


class Doubling(Technique):
    """A toy technique, known to the package only by its registration: what travels is
    ``2 x`` (a new tensor), and the result is halved back into DDP's buffer (exact in
    binary floating point)."""

    name = "doubling"
    log: ClassVar[list[str]] = []

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return True

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        return "doubling cannot pair with fill='zero'" if config.fill == "zero" else None

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        self.log.append("before")
        return x * 2

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        self.log.append("after")
        return call.bucket.copy_(out / 2)


class Tracing(Technique):
    """Records where in the chain it runs."""

    name = "tracing"

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return True

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        Doubling.log.append("trace-before")
        return x

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        Doubling.log.append("trace-after")
        return out


def test_a_technique_added_by_registration_alone_runs_in_the_hook(monkeypatch):
    """Registered in CHAIN before the fill (and a tracer before it), the toy runs in the
    real hook: before the wire in chain order, after the collective in reverse order, on
    what travels (its doubled copy, lost and rescaled by the fill); the gradients equal the
    run without it bitwise. Registered in TECHNIQUES, its refusal is raised by LossConfig."""
    settings = {"loss_rate": 0.3, "mtu": 400, "seed": 4, "counts_transport": "separate"}
    with single_process_group():
        plain = one_step(LossyState(**settings))
        chain = list(techniques.CHAIN)
        chain[chain.index(techniques.Fill) : chain.index(techniques.Fill)] = [Tracing, Doubling]
        monkeypatch.setattr(techniques, "CHAIN", tuple(chain))
        monkeypatch.setattr(techniques, "TECHNIQUES", (*techniques.TECHNIQUES, Doubling))
        state = LossyState(**settings)
        assert [t.name for t in state.techniques] == ["tracing", "doubling", "rescale", "wire_dtype"]
        Doubling.log.clear()
        toy = one_step(state)
    assert torch.equal(toy, plain) and state.stats()["worker"]["packets_lost"] > 0
    assert state.bucket_calls == 1  # DDP's first iteration: one bucket
    assert Doubling.log == ["trace-before", "before", "after", "trace-after"]
    with pytest.raises(ValueError, match="doubling cannot pair with fill='zero'"):
        LossyState(loss_rate=0.1, fill="zero")


@pytest.mark.parametrize(
    ("settings", "technique"),
    [
        ({"loss_rate": 0.3}, "rescale"),
        ({"loss_rate": 0.3, "fill": "zero", "fec": (4, 1)}, "protection"),
        ({"loss_rate": 0.3, "fill": "zero", "fec": (4, 1)}, "fec"),
        ({"loss_rate": 0.3, "fill": "zero", "retransmit": 2}, "retransmit"),
        ({"loss_rate": 0.3, "fill": "zero", "protect": "bias"}, "protect"),
    ],
)
def test_a_technique_adds_its_counters_to_stats_and_only_when_used(settings, technique):
    cls = next(c for c in TECHNIQUES if c.name == technique)
    with single_process_group():
        used = LossyState(mtu=400, **settings)
        one_step(used)
        unused = LossyState(mtu=400, loss_rate=0.3, fill="zero")
        one_step(unused)
    assert set(cls.counters) <= set(used.stats()["worker"])
    assert not set(cls.counters) & set(unused.stats()["worker"])
