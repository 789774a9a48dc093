"""The examples of README and of the pages it sends a reader to (docs/reference.md,
docs/tools.md) run as written (with sizes cut down where they would take minutes) and give
what those pages say they give; docs/architecture.md's layout names every module."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lossy_hooks.study.sweeping.launch import run_dir_for

from ..launch import ROOT, free_port
from .study_batch import Run, SharedRuns, uses, wanted_runs

# README first: a command is looked up in the order a reader meets it
PAGES = ("README.md", "docs/reference.md", "docs/tools.md")
DOCS = "\n".join((ROOT / page).read_text() for page in PAGES)
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
SHRINK = ["--num_epochs", "1", "--max_steps", "2", "--lab_round", "1"]  # last flag wins


def readme_command(prefix: str) -> list[str]:
    """The first line of README or its pages that starts with ``prefix`` (inside a code block), as argv."""
    for line in DOCS.splitlines():
        line = line.strip().strip("`")
        if line.startswith(prefix):
            return shlex.split(line)
    raise AssertionError(f"README and its pages have no command starting with {prefix!r}")


def env() -> dict[str, str]:
    from .test_train_ddp import env as train_env

    return train_env()


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600, cwd=cwd)


def script_run(prefix: str, extra: list[str], in_folder: bool = False) -> Run:
    """README's train_ddp.py command starting with ``prefix`` as a run of a shared launch
    (tests/study/study_batch.py): ``torchrun --nproc_per_node=W`` runs as a group of W ranks,
    ``python`` as one process; the script's flags as written, then ``extra``."""
    argv = readme_command(prefix)
    argv = argv[argv.index("torchrun") :] if "torchrun" in argv else argv[argv.index("python") :]
    i = next(i for i, a in enumerate(argv) if a.endswith("train_ddp.py"))
    if argv[0] == "torchrun":
        (launcher,) = argv[1:i]  # the only launcher flag a README command may have here
        assert launcher.startswith("--nproc_per_node="), argv
        world = int(launcher.split("=", 1)[1])
    else:
        assert argv[:i] == ["python"], argv
        world = 1
    return Run(world, lambda ctx: [*argv[i + 1 :], *extra], in_folder=in_folder)


def readme_runs() -> dict[str, Run]:
    """The README commands that run train_ddp.py, shortened (the last flag wins)."""
    return {
        # no --output_dir: the run writes runs/<name> under its working folder
        "quick": script_run("pip install -e . && torchrun", [*SHRINK, "--workers", "0"], in_folder=True),
        "smoke": script_run("python train_ddp.py --dataset digits --model resnet18", ["--max_steps", "3"]),
        "tail": script_run("python train_ddp.py --dataset digits --model squeezenet1_1", []),
        "language_model": script_run(
            "torchrun --nproc_per_node=2 train_ddp.py --model gpt-tiny --strategy fsdp", ["--max_steps", "6"]
        ),
        "deadline": script_run(
            "torchrun --nproc_per_node=2 train_ddp.py --dataset digits --model resnet18 --num_epochs 4",
            [*SHRINK, "--max_steps", "4"],
        ),
    }


@pytest.fixture(scope="module")
def study(request, tmp_path_factory) -> SharedRuns:
    """README's study-script commands: one process for those of world size 1, one group of
    2 ranks for the torchrun ones, made on first use (those the selected tests need)."""
    return SharedRuns(tmp_path_factory.mktemp("readme"), {}, readme_runs(), {}, wanted_runs(request))


def finished(study: SharedRuns, name: str) -> Path:
    """The folder run ``name`` wrote, once it ended with exit 0 (its one configuration)."""
    res = study.result(name)
    assert res["code"] == 0, res["stdout"] + res["stderr"]
    (run_dir,) = study.out(name).iterdir()
    return run_dir


@uses("quick")
def test_quick_study_command_makes_the_folder_it_names(study):
    line = readme_command("pip install -e . && torchrun")
    argv = line[line.index("torchrun") :]
    named = re.search(r"`runs/(\S+?)/`", DOCS).group(1)
    flags = argv[argv.index("train_ddp.py") + 1 :]
    assert run_dir_for(flags, 2)[0] == Path("runs") / named  # the folder the whole command names
    assert study.runs["quick"].world == 2
    res = study.result("quick")
    assert res["code"] == 0, res["stdout"] + res["stderr"]
    shrunk, _ = run_dir_for([*flags, *SHRINK], 2)  # the cut run: its own folder (epochs, steps)
    run_dir = study.out("quick") / shrunk
    for name in ("config.json", "round0/metrics.csv", "round0/checkpoint.pt", "round0/final.pt"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "summary.csv").exists() and (run_dir / "summary.png").exists()


@uses("smoke")
def test_smoke_command_runs(study):
    run_dir = finished(study, "smoke")
    assert run_dir.name == (
        "digits_resnet18_w1_worker_rescale_mean_mtu300_acc1_random-10pct_bucket25mb_ep1_bs32_r1_steps3"
    )


@uses("tail")
def test_tail_drop_example_lands_where_the_readme_says(study):
    run_dir = finished(study, "tail")
    with open(run_dir / "round0" / "layers.csv", newline="") as fh:
        rate = {r["parameter"]: float(r["loss_rate"]) for r in csv.DictReader(fh)}
    with open(run_dir / "round0" / "buckets.csv", newline="") as fh:
        (bucket,) = list(csv.DictReader(fh))
    assert bucket["packets"] == "1941" and "1,941 packets whose last 195" in DOCS
    early = {p for p in rate if re.match(r"features\.[0-6]\.", p)} | {"features.7.squeeze.bias"}
    assert early and all(rate[p] == 1.0 for p in early)
    assert rate["features.7.squeeze.weight"] == pytest.approx(0.227, abs=0.001)
    assert "`features.7.squeeze.weight` 22.7%" in DOCS
    rest = set(rate) - early - {"features.7.squeeze.weight"}
    assert rest and all(rate[p] == 0.0 for p in rest)


def test_layout_example_numbers(tmp_path):
    line = readme_command("python -m lossy_hooks.tools.bucket_layout")
    argv = [a for a in line if not a.startswith("[")]
    argv = argv[: argv.index("--mtu") + 2]
    out = tmp_path / "l.json"
    res = run([sys.executable, *argv[1:], "--json", str(out)], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    layout = json.loads(out.read_text())
    assert layout["num_buckets"] == 7 and "7 buckets" in DOCS
    assert layout["packets_per_step"] == 118_800 and "118,800 packets" in DOCS
    assert round(100 * layout["straddling_share"], 2) == 0.21 and "0.21% straddling" in DOCS
    assert round(layout["buckets"][0]["bytes"] / 1e6, 1) == 30.3 and "bucket 0 holds 30.3 MB" in DOCS


def test_sweep_and_compare_commands(tmp_path):
    """README's sweep command, its grid cut to one configuration and its runs to one step,
    then compare on what it made."""
    argv = readme_command("python -m lossy_hooks.tools.sweep --nproc")
    cut = argv.index("--")
    one = ["--grid", "loss_rate=0.1", "drop_point=worker", "fill=rescale"]  # the last --grid wins
    shrink = [*SHRINK, "--workers", "0", "--output_dir", str(tmp_path / "runs")]
    res = run([sys.executable, *argv[1:cut], *one, *argv[cut:], *shrink], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 ran, 0 skipped, 0 submitted, 0 diverged, 0 failed" in res.stdout
    compare = readme_command("python -m lossy_hooks.tools.compare")
    assert compare[:3] == ["python", "-m", "lossy_hooks.tools.compare"]
    res = run([sys.executable, "-m", "lossy_hooks.tools.compare", str(tmp_path / "runs")], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "runs" / "compare" / "compare.csv").exists()


def test_hook_snippet_runs_in_a_ddp_program(tmp_path):
    """README's two-line snippet, pasted into a one-process DDP program."""
    block = DOCS.split("## The hook in your DDP code", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    snippet = block.replace("...", "ddp_model(torch.ones(4, 8)).sum().backward()")
    program = (
        "import torch\nfrom torch.nn.parallel import DistributedDataParallel as DDP\n"
        "from lossy_hooks.core.process_group import single_process_group\n"
        "with single_process_group():\n"
        "    ddp_model = DDP(torch.nn.Linear(8, 2))\n"
        + "".join(f"    {line}\n" for line in snippet.strip().splitlines())
    )
    script = tmp_path / "snippet.py"
    script.write_text(program)
    res = run([sys.executable, str(script)], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "'packets_sent': 1" in res.stdout  # 18 parameters in one packet of 375
    assert "{'worker': {'packets_sent': 1, 'packets_lost': " in res.stdout  # since the (first) mark


STEPS = (
    "x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(dist.get_rank()))\n"
    "for _ in range(3):\n"
    "    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()"
)


def test_fsdp_snippet_runs_in_a_two_rank_fsdp_program(tmp_path):
    """README's FSDP2 snippet, pasted into a 2-rank Gloo program on the GPT."""
    section = DOCS.split("### FSDP2\n", 1)[1]
    snippet = section.split("```python", 1)[1].split("```", 1)[0]
    program = (
        "import torch, torch.distributed as dist\n"
        "from lossy_hooks.study.workloads.gpt import build_gpt\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(0)\n"
        "model = build_gpt('gpt-tiny')\n"
        + snippet.replace("...", STEPS)
        + "st, ag = state.stats(all_ranks=True)['worker'], gather.stats(all_ranks=True)['post']\n"
        "if dist.get_rank() == 0:\n"
        "    print('RESULT', *(d[k] for d in (st, ag) for k in ('packets_sent', 'packets_lost')))\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    script = tmp_path / "fsdp_snippet.py"
    script.write_text(program)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    res = run([*launcher, str(script)], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    sent, lost, ag_sent, ag_lost = map(int, res.stdout.split("RESULT", 1)[1].split()[:4])
    # 3 reduce-scatter rounds of 3 units, each rank sending (W-1) rows: 67 + 67 + 50 packets
    assert sent == 2 * 3 * (67 + 67 + 50) and 0 < lost < sent // 5
    assert ag_sent > 0 and ag_lost < ag_sent // 20 + 30


@uses("language_model")
def test_language_model_command_reports_perplexity(study):
    run_dir = finished(study, "language_model")
    with open(run_dir / "round0" / "metrics.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["steps"] == "6" and float(row["val_perplexity"]) > 1.0
    assert int(row["worker_packets_sent"]) > 0 and int(row["gather_packets_sent"]) > 0


@uses("deadline")
def test_deadline_command_prices_time_and_loses_late_packets(study):
    run_dir = finished(study, "deadline")
    assert "_deadline-1p2x_" in run_dir.name and "_net1g-5us-lognormal-7p6-1_ep1_" in run_dir.name
    with open(run_dir / "round0" / "metrics.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    lossfree, lossy = float(row["sim_lossfree_s"]), float(row["sim_comm_s"])
    assert 0 < lossfree <= lossy <= 1.2 * lossfree * (1 + 1e-5)
    assert 0 < int(row["worker_packets_lost"]) < int(row["worker_packets_sent"])
    assert "sim_time_s" in (run_dir / "summary.csv").read_text()


def _readme_pattern() -> re.Pattern[str]:
    """README's folder-name pattern as a regex: ``<x>`` a part without ``_`` (``<model>``:
    any text; torchvision names have underscores), ``[...]`` optional, ``[...]...`` any
    number of times, ``(a|b)`` one of."""
    text = DOCS.split("**Outputs.**", 1)[1].split("<output_dir>/", 1)[1].split("/\n", 1)[0]
    out = []
    for token in re.findall(r"<[^<>]+>|\[|\]\.\.\.|\]|\(|\)|\||[^<>\[\]()|]+", text):
        if token.startswith("<"):
            out.append(".+?" if token == "<model>" else "[^_]+")
        else:
            out.append(
                {"[": "(?:", "]": ")?", "]...": ")*", "(": "(?:", ")": ")", "|": "|"}.get(
                    token, re.escape(token)
                )
            )
    return re.compile("".join(out))


NAMED = [  # flags -> parts their folder name must have (every optional part at least once)
    ("--dataset digits --model resnet18", []),
    (
        "--dataset digits --model resnet18 --encoding hadamard --wire_dtype fp16 --protect bias "
        "--fec 8 1 --retransmit 1 --tag try2",
        ["_hadamard262144", "_wire-fp16", "_protect-bias", "_fec8-1", "_retx1", "_try2"],
    ),
    ("--dataset digits --model resnet18 --worker_drop --use_zero --error_feedback", ["_ef"]),
    (
        "--model gpt-tiny --strategy fsdp --all_gather_loss_rate 0.1 --optimizer adamw --corpus_mb 0.5 "
        "--drop_point both --post_sync independent",
        ["_both-independent_", "_fsdp", "_ag0p1-stale", "_adamw", "_corpus0p5mb"],
    ),
    (
        "--dataset digits --model mobilenet_v3_small --loss_model 'deadline 1.2x' --bandwidth_gbps 10 "
        "--jitter 'lognormal 3 1' --straggler_prob 0.1 --straggler_factor 2 --net_drop_rate 0.01 "
        "--rto_us 500",
        ["_deadline-1p2x_", "_net10g-5us-lognormal-3-1-strag0p1x2-drop0p01-rto500"],
    ),
    ("--dataset digits --model resnet18 --packetization tensor", ["_pkt-tensor_"]),
    (
        "--dataset digits --model resnet18 --worker_drop --algorithm dbtree --ranks_per_node 2 "
        "--link_loss '3->4=5%; 0->1=gemodel 1% 20%' --num_epochs 6 --batch_size 32 --lr 0.02 --seed 1 "
        "--lab_round 2 --max_steps 20 --amp --eval_every 2 --tag try3",
        [
            "_dbtree_node2_links-3to4-5pct-0to1-gemodel-1pct-20pct_",
            "_ep6_bs32_lr0p02_seed1_r2_steps20_amp_eval-every-2_try3",
        ],
    ),
]


@pytest.mark.parametrize("flags, parts", NAMED, ids=range(len(NAMED)))
def test_the_folder_pattern_is_the_code_s(flags, parts):
    """The names train_ddp.py gives configurations fit README's pattern, part for part."""
    from lossy_hooks.study.cli import resolve
    from lossy_hooks.study.flags import build_parser
    from lossy_hooks.study.run_names import config_name

    parser = build_parser()
    name = config_name(resolve(parser.parse_args(shlex.split(flags)), parser))
    assert _readme_pattern().fullmatch(name), name
    for part in parts:
        assert part in name, (part, name)
    assert not _readme_pattern().fullmatch(name.replace("_bucket", "_")), "a pattern that takes anything"


def _layout() -> tuple[set[str], set[str]]:
    """The paths docs/architecture.md's layout block names, and the folders it names."""
    block = ARCHITECTURE.split("## Layout", 1)[1].split("```", 2)[1]
    named, folders, current = set(), set(), None
    for line in block.strip("\n").splitlines():
        if not line.startswith(" "):
            left, _, desc = line.partition("  ")
            items = [x.strip() for x in left.split(", ")]
            base = items[0].rsplit("/", 1)[0] + "/" if "/" in items[0].rstrip("/") else ""
            paths = [items[0]] + [base + x for x in items[1:]]
            named |= set(paths)
            current = paths[0] if paths[0].endswith("/") else None
            if current:
                folders.add(current)
        else:
            desc = line
        if current:  # a folder's line and its continuations name its modules
            named |= {current + m for m in re.findall(r"\b(\w+\.py)\b", desc)}
    return named, folders


def test_the_layout_block_names_every_module_and_document_and_nothing_else():
    named, folders = _layout()
    for path in named:
        assert (ROOT / path).exists(), f"docs/architecture.md's layout names {path}, which does not exist"
    required = {str(p.relative_to(ROOT)) for p in (ROOT / "lossy_hooks").rglob("*.py")}
    required |= {str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")}
    required |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    required |= {".ci/run", "train_ddp.py", "pyproject.toml", "lossy_hooks/assets/", "mutation/mutants.py"}
    required |= {str(p.relative_to(ROOT)) + "/" for p in (ROOT / "docs").iterdir() if p.is_dir()}
    covered = named | {f + "__init__.py" for f in folders}
    missing = sorted(r for r in required if r not in covered)
    assert not missing, f"docs/architecture.md's layout does not name {missing}"


def _module_commands() -> dict[str, set[str]]:
    """Every ``-m lossy_hooks...`` module written in README.md, docs/*.md and the package's
    own docstrings and messages (``python -m``, ``torchrun ... -m``), with the files that
    name it; a placeholder such as ``lossy_hooks.tools.<tool>`` is a pattern, not a command."""
    texts = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "lossy_hooks").rglob("*.py")),
    ]
    found: dict[str, set[str]] = {}
    for path in texts:
        for name, placeholder in re.findall(r"-m (lossy_hooks(?:\.\w+)*)(\.<)?", path.read_text()):
            if not placeholder:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_module_command_in_the_docs_names_a_module_that_runs():
    """``python -m lossy_hooks.<module>`` in the docs names a module of this checkout (a
    package would need a ``__main__``), found with importlib.util.find_spec, not run."""
    import importlib.machinery
    import importlib.util

    origin = importlib.util.find_spec("lossy_hooks").origin
    assert Path(origin).is_relative_to(ROOT), f"lossy_hooks comes from {origin}, not this checkout"
    found = _module_commands()
    assert {
        "lossy_hooks.tools.sweep",
        "lossy_hooks.experiments.time_study",
        "lossy_hooks.study.train",
    } <= set(found)

    def spec_of(name: str) -> importlib.machinery.ModuleSpec | None:
        try:
            return importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent package is missing
            return None

    missing = []
    for name, where in sorted(found.items()):
        spec = spec_of(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = spec_of(name + ".__main__")
        if spec is None:
            missing.append(f"{name} (in {', '.join(sorted(where))})")
    assert not missing, "no such module: " + "; ".join(missing)
