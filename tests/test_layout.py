"""The layout tool against hand-computed numbers for a small model."""

from __future__ import annotations

import json

import torch
from torch import nn

from lossy_hooks.layout import bucket_layout, main, straddling_packets


class Chain(nn.Module):
    """Linear(10->20) then Linear(20->5): params w1 (200), b1 (20), w2 (100), b2 (5)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(10, 20)
        self.l2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def test_straddling_packets_by_hand():
    # boundaries at 200, 220, 320 with k=75: 200 -> packet 2, 220 -> packet 2, 320 -> packet 4
    assert straddling_packets([200, 20, 100, 5], 75) == 2
    assert straddling_packets([150, 75], 75) == 0  # boundary on a packet boundary
    assert straddling_packets([7], 75) == 0


def test_bucket_layout_of_a_small_model(tmp_path):
    layout = bucket_layout(Chain(), bucket_cap_mb=25, mtu=300, example_input=torch.zeros(2, 10))
    assert layout["num_buckets"] == 1 and layout["elements_per_packet"] == 75
    (b,) = layout["buckets"]
    # rebuilt in gradient-ready order: the last layer's gradients come first
    assert b["param_names"] == ["l2.bias", "l2.weight", "l1.bias", "l1.weight"]
    assert b["elements"] == 325 and b["bytes"] == 1300
    assert b["packets"] == 5  # ceil(325 / 75)
    # boundaries at 5, 105, 125: packets 0, 1 and 1 -> 2 straddling packets
    assert b["straddling_packets"] == 2
    assert layout["straddling_share"] == 2 / 5
    fp16 = bucket_layout(
        Chain(), bucket_cap_mb=25, mtu=300, dtype=torch.bfloat16, example_input=torch.zeros(2, 10)
    )
    assert fp16["elements_per_packet"] == 150 and fp16["buckets"][0]["bytes"] == 650
    assert fp16["buckets"][0]["packets"] == 3


def test_small_buckets_split_the_model():
    # 3 x 1 MiB layers with a 0.5 MiB cap: several buckets (DDP's first rebuilt bucket may
    # take up to 1 MiB whatever the cap: that is what DDP does, and the tool shows it)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])
    layout = bucket_layout(model, bucket_cap_mb=0.5, mtu=1500, example_input=torch.zeros(2, 512))
    assert layout["num_buckets"] >= 3
    total = 3 * (512 * 512 + 512)
    assert sum(b["elements"] for b in layout["buckets"]) == total
    assert layout["packets_per_step"] == sum(-(-b["elements"] // 375) for b in layout["buckets"])
    assert all(b["bytes"] <= 1024 * 1024 + 4 * 512 for b in layout["buckets"])


def test_cli_writes_csv_and_json(tmp_path, capsys):
    out_json, out_csv = tmp_path / "l.json", tmp_path / "l.csv"
    assert (
        main(
            [
                "--model",
                "squeezenet1_1",
                "--num_classes",
                "10",
                "--image_size",
                "64",
                "--json",
                str(out_json),
                "--csv",
                str(out_csv),
            ]
        )
        == 0
    )
    data = json.loads(out_json.read_text())
    n_params = sum(b["elements"] for b in data["buckets"])
    assert n_params == 727_626
    assert out_csv.read_text().count("\n") == data["num_buckets"] + 1
    assert "packets per step" in capsys.readouterr().out
