"""The layout tool against hand-computed numbers for a small model."""

from __future__ import annotations

import json

import torch
from torch import nn

from lossy_hooks.tools.bucket_layout import bucket_layout, main, straddling_packets


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
    # 3 x 1 MiB layers with an explicit 0.5 MiB cap: every bucket, the first included, closes
    # after the parameter that reaches 0.5 MiB, so each 1 MiB weight gets a bucket of its own
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])
    layout = bucket_layout(model, bucket_cap_mb=0.5, mtu=1500, example_input=torch.zeros(2, 512))
    total = 3 * (512 * 512 + 512)
    assert sum(b["elements"] for b in layout["buckets"]) == total
    assert layout["packets_per_step"] == sum(-(-b["elements"] // 375) for b in layout["buckets"])
    assert layout["first_bucket_cap_bytes"] == 512 * 1024
    assert "passed" in layout["first_bucket_rule"]
    # the bias (2 KiB) comes first in gradient-ready order, then a weight crosses the cap
    assert [b["elements"] for b in layout["buckets"]] == [512 + 512 * 512] * 3


def test_first_bucket_cap_only_when_bucket_cap_is_not_passed():
    """DDP's 1 MiB first-bucket cap applies only with bucket_cap_mb left out: with 80 layers
    of 64x64 (16.6 kB each), the explicit 25 MiB cap gives one bucket, DDP's defaults give a
    first bucket closing right after 1 MiB and the rest in a second."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(80)])
    x = torch.zeros(2, 64)
    explicit = bucket_layout(model, bucket_cap_mb=25, mtu=1500, example_input=x)
    default = bucket_layout(model, bucket_cap_mb=None, mtu=1500, example_input=x)
    assert explicit["num_buckets"] == 1
    assert default["first_bucket_cap_bytes"] == 1024 * 1024 and "not passed" in default["first_bucket_rule"]
    first = default["buckets"][0]["bytes"]
    per_layer = (64 * 64 + 64) * 4
    assert 1024 * 1024 <= first < 1024 * 1024 + per_layer
    assert default["num_buckets"] == 2


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
