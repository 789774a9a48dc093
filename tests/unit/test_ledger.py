"""PacketLedger on its own (no process group): counts, per-parameter ranges, deltas since a
mark, and its checkpoint, against numbers worked out by hand."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from lossy_hooks.core import ledger as ledger_module
from lossy_hooks.core.counters import BucketEntry
from lossy_hooks.core.ledger import PacketLedger

# bucket (0, 10, 0): parameters a (4 elements) and b (6), 3 elements per packet -> packets
# [0,3) [3,6) [6,9) [9,10): a is carried by packets 0-1, b by packets 1-3
KEY = (0, 10, 0)
NAMES = {101: "a", 102: "b"}


def ledger() -> PacketLedger:
    led = PacketLedger(("worker", "post"), track_unrecovered=True)
    led.register(
        KEY, BucketEntry(packets=4, sizes=(4, 6), param_ids=(101, 102), packet_numel=3, wire_bytes=40)
    )
    return led


def mask(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_counts_per_point_bucket_and_parameter():
    led = ledger()
    led.count("worker", KEY, 4, mask(1, 0, 0, 1))
    led.count("worker", KEY, 4, mask(1, 1, 0, 0))
    led.count("post", KEY, 4, None)  # lossless draw: sent, nothing lost
    led.unrecovered_counter(KEY, torch.device("cpu")).add_(2)
    st = led.stats()
    assert st["worker"] == {
        "packets_sent": 8,
        "packets_lost": 4,
        "loss_rate": 0.5,
        "bytes_sent": 80,  # 2 calls of 40 bytes
        "packets_unrecovered": 2,
    }
    assert st["post"] == {"packets_sent": 4, "packets_lost": 0, "loss_rate": 0.0, "bytes_sent": 40}
    assert st["buckets"] == [
        {"index": 0, "numel": 10, "generation": 0, "packets": 4}
        | {"worker_sent": 8, "worker_lost": 4, "post_sent": 4, "post_lost": 0}
    ]
    rows = {(r["drop_point"], r["parameter"]): r for r in led.loss_by_parameter(NAMES)}
    # a: packets 0-1 over 2 calls = 4 sent; lost: packet 0 twice, packet 1 once = 3
    assert (rows["worker", "a"]["packets_sent"], rows["worker", "a"]["packets_lost"]) == (4, 3)
    # b: packets 1-3 over 2 calls = 6 sent; lost: packet 1 once, packet 3 once = 2
    assert (rows["worker", "b"]["packets_sent"], rows["worker", "b"]["packets_lost"]) == (6, 2)
    assert rows["post", "b"]["packets_sent"] == 3 and rows["post", "b"]["packets_lost"] == 0


class ThreeRanks:
    """A stand-in for ``torch.distributed`` as the ledger uses it, for W ledgers run in W
    threads: ``all_reduce`` sums the W ranks' tensors (each thread is one rank)."""

    def __init__(self, world: int) -> None:
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.group = SimpleNamespace(WORLD=None)

    def all_reduce(self, vec: torch.Tensor, group=None) -> None:
        self.slots[self.local.rank] = vec.clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)  # type: ignore[arg-type]
        self.barrier.wait()
        vec.copy_(total)

    def get_world_size(self, group=None) -> int:
        return self.world

    def run(self, fn, args: list) -> list:
        def one(rank: int):
            self.local.rank = rank
            return fn(args[rank])

        with ThreadPoolExecutor(self.world) as pool:
            return list(pool.map(one, range(self.world)))


def test_per_parameter_sent_lost_and_rate_are_summed_over_ranks(monkeypatch):
    """loss_by_parameter(all_ranks=True) at W = 3 (three ledgers, a summing all_reduce): a
    parameter's packets sent are summed over the ranks as its lost ones are, so its loss rate
    is the group's (layers.csv's rate; sent taken from one rank would make it W times too high)."""
    group = ThreeRanks(3)
    monkeypatch.setattr(ledger_module, "dist", group)
    worker_masks = [  # per rank: two calls
        (mask(1, 0, 0, 1), mask(1, 1, 0, 0)),
        (mask(0, 0, 0, 0), mask(0, 0, 1, 0)),
        (mask(1, 1, 1, 1), mask(0, 0, 0, 1)),
    ]
    ledgers = []
    for masks in worker_masks:
        led = ledger()
        led.to(torch.device("cpu"))
        for m in masks:
            led.count("worker", KEY, 4, m)
        led.count("post", KEY, 4, None)
        ledgers.append(led)
    by_rank = group.run(lambda led: led.loss_by_parameter(NAMES, all_ranks=True), ledgers)
    for rows in by_rank:  # every rank reads the group's figures
        got = {(r["drop_point"], r["parameter"]): r for r in rows}
        # a (packets 0-1): 2 packets x 2 calls x 3 ranks sent; lost 3 + 0 + 2
        assert (got["worker", "a"]["packets_sent"], got["worker", "a"]["packets_lost"]) == (12, 5)
        # b (packets 1-3): 3 x 2 x 3 sent; lost 2 + 1 + 4
        assert (got["worker", "b"]["packets_sent"], got["worker", "b"]["packets_lost"]) == (18, 7)
        assert got["worker", "a"]["loss_rate"] == 5 / 12 and got["worker", "b"]["loss_rate"] == 7 / 18
        assert (got["post", "a"]["packets_sent"], got["post", "b"]["packets_sent"]) == (6, 9)
        assert got["post", "b"]["packets_lost"] == 0 and got["post", "b"]["loss_rate"] == 0.0
    # the group's per-point figures: 4 packets x 2 calls x 3 ranks sent, 4 + 1 + 5 lost
    stats = group.run(lambda led: led.stats(all_ranks=True), ledgers)
    assert all((s["worker"]["packets_sent"], s["worker"]["packets_lost"]) == (24, 10) for s in stats)


def test_since_mark_gives_deltas_and_the_mark_survives_a_checkpoint():
    led = ledger()
    led.count("worker", KEY, 4, mask(1, 0, 0, 0))
    first = led.since_mark(NAMES, all_ranks=False)
    assert first["points"]["worker"] == {
        "packets_sent": 4,
        "packets_lost": 1,
        "bytes_sent": 40,
        "packets_unrecovered": 0,
    }
    assert first["points"]["post"] == {"packets_sent": 0, "packets_lost": 0, "bytes_sent": 0}
    assert [(b["drop_point"], b["packets_sent"], b["packets_lost"]) for b in first["buckets"]] == [
        ("worker", 4, 1)
    ]  # post sent nothing in the interval: no row
    assert first["buckets"][0]["params"] == ["a", "b"]
    led.count("worker", KEY, 4, mask(0, 0, 1, 1))
    buf = io.BytesIO()
    torch.save(led.state_dict(), buf)
    buf.seek(0)
    resumed = PacketLedger(("worker", "post"), track_unrecovered=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    # a new process: the bucket is registered again with its new parameter identities
    resumed.register(
        KEY, BucketEntry(packets=4, sizes=(4, 6), param_ids=(201, 202), packet_numel=3, wire_bytes=40)
    )
    second = resumed.since_mark({201: "a", 202: "b"}, all_ranks=False)
    worker = second["points"]["worker"]
    assert (worker["packets_sent"], worker["packets_lost"], worker["bytes_sent"]) == (4, 2, 40)
    by_param = {
        (r["drop_point"], r["parameter"]): (r["packets_sent"], r["packets_lost"])
        for r in second["parameters"]
    }
    assert by_param["worker", "a"] == (2, 0) and by_param["worker", "b"] == (3, 2)
    assert set(resumed.since_mark({201: "a", 202: "b"}, all_ranks=False)["points"]["worker"].values()) == {0}


def test_fidelity_records_only_finished_steps():
    led = PacketLedger(("worker",), track_unrecovered=False)
    # step 0: two buckets; x = lossy, y = lossless: sums [<x,y>, <x,x>, <y,y>, |x-y|^2]
    led.fidelity_slot(0, torch.device("cpu")).copy_(torch.tensor([3.0, 4.0, 4.0, 0.0], dtype=torch.float64))
    led.fidelity_slot(0, torch.device("cpu")).copy_(torch.tensor([0.0, 0.0, 5.0, 5.0], dtype=torch.float64))
    led.fidelity_slot(1, torch.device("cpu"))
    (rec,) = led.fidelity(steps_done=1)
    assert rec["step"] == 0
    assert abs(rec["cosine"] - 3 / (4 * 9) ** 0.5) < 1e-12 and abs(rec["rel_l2"] - (5 / 9) ** 0.5) < 1e-12
    assert led.fidelity(steps_done=1) == [] and len(led.fidelity(steps_done=2)) == 1


def test_version_2_checkpoint_counters_are_read():
    v2 = {
        "packets": {"0:10:0": 4},
        "sizes": {"0:10:0": [4, 6]},
        "worker": {
            "sent": {"0:10:0": 8},
            "lost_per_packet": {"0:10:0": torch.tensor([2, 1, 0, 1])},
            "unrecovered": {},
        },
        "post": {"sent": {}, "unrecovered": {}},
    }
    led = PacketLedger(("worker",), track_unrecovered=True)
    led.load_state_dict(PacketLedger.from_version_2(v2))
    assert led.stats()["worker"]["packets_lost"] == 4 and led.buckets[KEY].sizes == (4, 6)


def test_collectives_per_kind_counts_deltas_and_checkpoint():
    """A lossy group's kinds: calls, packets, bytes and losses per kind in stats(), their
    changes since the last mark, and the counters through a checkpoint."""
    led = PacketLedger(("worker",), False)
    led.count_collective("p2p", 10, 4000, torch.tensor([True, False, True, False]))
    led.count_collective("p2p", 6, 2400, None)
    led.count_collective("all_to_all", 8, 3200, torch.tensor([[True, True], [False, True]]))
    assert led.collective_rows() == {
        "all_to_all": {
            "calls": 1,
            "packets_sent": 8,
            "packets_lost": 3,
            "loss_rate": 3 / 8,
            "bytes_sent": 3200,
        },
        "p2p": {"calls": 2, "packets_sent": 16, "packets_lost": 2, "loss_rate": 2 / 16, "bytes_sent": 6400},
    }
    first = led.since_mark({}, all_ranks=False)["collectives"]
    assert first["p2p"]["packets_sent"] == 16 and first["p2p"]["loss_rate"] == 2 / 16
    led.count_collective("p2p", 4, 1600, torch.tensor([True, True, False, False]))
    buf = io.BytesIO()
    torch.save(led.state_dict(), buf)
    again = PacketLedger(("worker",), False)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    second = again.since_mark({}, all_ranks=False)["collectives"]
    assert second["p2p"] == {
        "calls": 1,
        "packets_sent": 4,
        "packets_lost": 2,
        "bytes_sent": 1600,
        "loss_rate": 0.5,
    }
    assert second["all_to_all"]["packets_sent"] == 0 and second["all_to_all"]["loss_rate"] == 0.0
