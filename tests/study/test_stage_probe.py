"""The pipeline-loss gradient probe (lossy_hooks/experiments/stage_probe.py), one process: the
LayerNorm Jacobian at a zero vector against its closed form, and on a fresh gpt-tiny a zeroed
packet returns a larger gradient than the intact message while a stale one does not."""

from __future__ import annotations

import csv

import pytest
import torch

from lossy_hooks.experiments import stage_probe


def test_layernorm_jacobian_at_zero_is_gamma_times_centering_over_sqrt_eps():
    """J^T u = (I - 11^T/C) diag(gamma) u / sqrt(eps) at x = 0 (the module's formula)."""
    torch.manual_seed(0)
    c = 64
    ln = torch.nn.LayerNorm(c).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    u = torch.randn(c, dtype=torch.float64)
    (ln(x) * u).sum().backward()
    gu = ln.weight.detach() * u
    expected = (gu - gu.mean()) / (ln.eps**0.5)
    assert torch.allclose(x.grad, expected, rtol=1e-9, atol=0)
    assert ln.eps**-0.5 == pytest.approx(316.23, abs=0.01)


def test_zero_fill_returns_a_larger_gradient_and_stale_does_not(tmp_path, capsys):
    out = tmp_path / "probe.csv"
    assert stage_probe.main(["--trials", "4", "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = {r["fill"]: {k: float(v) for k, v in r.items() if k != "fill"} for r in csv.DictReader(fh)}
    assert list(rows) == list(stage_probe.FILLS)
    intact, zero, stale = rows["intact"], rows["zero"], rows["stale"]
    # the zeroed tokens' returned gradient is the largest of the batch, several times the intact one's
    assert zero["returned_grad_max_token"] > 3 * intact["returned_grad_max_token"]
    assert stale["returned_grad_max_token"] == pytest.approx(intact["returned_grad_max_token"], rel=0.2)
    # one packet of 5.9 tokens in 256: the typical token and the loss barely move
    assert zero["returned_grad_median_token"] == pytest.approx(intact["returned_grad_median_token"], rel=0.05)
    assert zero["loss"] == pytest.approx(intact["loss"], rel=0.01)
    assert "fill=zero" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mtu", "1502"], "--mtu must be a positive multiple of 4"),
        (["--trials", "1"], "--trials must be >= 2"),
        (["--checkpoint", "/nonexistent/final.pt"], "--checkpoint /nonexistent/final.pt: no such file"),
        (["--model", "moe-tiny"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        stage_probe.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_of_shards_is_refused(tmp_path, capsys):
    """An FSDP2 (or --tp) run's ranks save shards of their stage's parameters: refused, exit 2
    naming the flag and the shapes, before any probe."""
    from lossy_hooks.study.workloads.gpt import GPTStage, build_gpt

    model = build_gpt("gpt-tiny")
    ranks = []
    for s in range(2):
        own = {name: p.detach() for name, p in GPTStage(model, s, 2).named_parameters()}
        own["tok.weight" if s == 0 else "head.weight"] = torch.zeros(128, 64)  # half of the rows
        ranks.append({"model": own})
    path = tmp_path / "final.pt"
    torch.save({"ranks": ranks}, path)
    with pytest.raises(SystemExit) as exc:
        stage_probe.main(["--checkpoint", str(path), "--trials", "2"])
    assert exc.value.code == 2
    assert "rank 0's tok.weight is a shard (128, 64) of (256, 64)" in capsys.readouterr().err
