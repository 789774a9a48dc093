"""Every setting is declared once (core/declaration.py, LossConfig's fields): LossyState's
signature, its docstring, docs/reference.md, the study's flags and the refusals follow it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from lossy_hooks import LossyState
from lossy_hooks.core.declaration import COLLECTIVES, SHARDED, Setting
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.options import OPTION_DEFAULTS, LossConfig
from lossy_hooks.group import KINDS, check_group_state

ROOT = Path(__file__).resolve().parents[2]
NOT_SETTINGS = {"loss_rate": None, "process_group": None}  # LossyState's other two arguments
DECLARED = LossConfig.declared()
# a value other than the default for each setting that FSDP refuses
FSDP_REFUSED_VALUES = {
    "packetization": "tensor",
    "measure_fidelity": True,
    "encoding": "hadamard",
    "wire_dtype": "bf16",
    "protect": "bias",
    "fec": (8, 1),
    "network": NetworkModel(),
}


def test_every_field_has_a_declaration_and_the_user_facing_ones_are_the_init_fields():
    fields = dataclasses.fields(LossConfig)
    assert all(isinstance(f.metadata["setting"], Setting) for f in fields)
    runtime = {f.name for f in fields if f.metadata["setting"].group == "runtime"}
    assert runtime == {"placement"}  # an object given by a test, not a user's setting
    assert set(DECLARED) == {f.name for f in fields if f.init} - runtime
    assert {f.name for f in fields if not f.init} == set(LossConfig.names("derived"))
    assert OPTION_DEFAULTS == {n: d for n, (d, s) in DECLARED.items() if s.group == "option"}


def test_the_states_signature_is_the_declared_settings_with_their_declared_defaults():
    """Parameter names (order aside) are LossConfig's user-facing init fields plus loss_rate
    and process_group; each default is the declared one, not a literal of its own."""
    params = inspect.signature(LossyState.__init__).parameters
    names = set(params) - {"self"}
    assert names == set(DECLARED) | set(NOT_SETTINGS)
    for name, (default, _) in DECLARED.items():
        assert params[name].default is default or params[name].default == default, name
    for name, default in NOT_SETTINGS.items():
        assert params[name].default is default
    source = inspect.getsource(LossyState.__init__).split(") -> None:")[0]
    for name in DECLARED:  # written as the declaration's default
        assert f"= LossConfig.{name}," in source, name


def test_each_declaration_is_consistent():
    for name, (default, declared) in DECLARED.items():
        assert declared.doc and declared.allowed, name
        assert set(declared.collectives) <= set(COLLECTIVES) and declared.collectives, name
        if declared.choices is not None:
            assert default in declared.choices, name
        if declared.fsdp:  # a setting FSDP refuses does not apply to FSDP's collectives
            assert not set(SHARDED) & set(declared.collectives), name
    assert COLLECTIVES == KINDS  # the lossy group's kinds, in its order


def test_the_docstring_lists_every_argument_with_its_default_unit_and_allowed_values():
    doc = inspect.getdoc(LossyState)
    arguments = doc.split("Arguments:", 1)[1]
    entries = {}
    for line in arguments.splitlines():
        if line.startswith("    ") and not line.startswith("        "):
            entries[line.split()[0]] = line
    assert list(entries) == ["loss_rate", *DECLARED, "process_group"]
    flat = " ".join(arguments.split())
    for name, (default, declared) in DECLARED.items():
        assert f"default {default!r})" in entries[name], name
        assert " ".join(declared.allowed_text.split()) in flat, name
        if declared.unit:
            assert f"unit: {declared.unit}" in flat, name


def test_every_value_check_of_a_choice_comes_from_the_declaration():
    for name, (_, declared) in DECLARED.items():
        if declared.choices is not None:
            with pytest.raises(ValueError, match=f"{name} must be one of"):
                LossConfig(**{name: "no-such-choice"})


@pytest.mark.parametrize("name", sorted(n for n, (_, s) in DECLARED.items() if s.fsdp))
def test_fsdp_refusals_are_the_declared_reasons(name):
    config = LossConfig(**{name: FSDP_REFUSED_VALUES[name]})
    refused, _, why = config.fsdp_refusal()
    assert (refused, why) == (name, DECLARED[name][1].fsdp)
    assert LossConfig().fsdp_refusal() is None


def test_group_refusals_are_the_declared_ones():
    """check_group_state raises each declared refusal for exactly the kinds it names."""
    cases = {
        "fill": dict(loss_rate=0.1),
        "reduction": dict(loss_rate=0.1, fill="zero", reduction="sum"),
        "link_loss": dict(loss_rate=0.1, fill="zero", algorithm="ring", link_loss="0->1=5%"),
        "loss_model": dict(fill="zero", loss_model="deadline 1.5x", network=NetworkModel()),
    }
    declared = {n for n, (_, s) in DECLARED.items() if s.refusals}
    assert declared == set(cases)
    for name, settings in cases.items():
        (refusal,) = DECLARED[name][1].refusals
        state = LossyState(**settings)
        for kind in KINDS:
            if kind in refusal.kinds:
                with pytest.raises(ValueError, match=re.escape(refusal.message.split("{kinds}")[0][:30])):
                    check_group_state(state, (kind,))
            elif kind != "reduce_scatter" or state.settings.fsdp_refusal() is None:
                assert check_group_state(state, (kind,)) == {kind}, (name, kind)


def _reference_table() -> dict[str, str]:
    """docs/reference.md's "LossyState arguments" table: ``{argument: default cell}``."""
    text = (ROOT / "docs" / "reference.md").read_text()
    section = text.split("## `LossyState` arguments", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {row.split(" | ")[0].strip("| `"): row.split(" | ")[1].strip("`") for row in rows}


def test_the_reference_lists_every_argument_with_its_declared_default():
    table = _reference_table()
    assert set(table) == set(DECLARED) | set(NOT_SETTINGS)
    for name, (default, _) in DECLARED.items():
        assert ast.literal_eval(table[name]) == default, name
    for name, default in NOT_SETTINGS.items():
        assert ast.literal_eval(table[name]) == default, name


def test_the_study_flags_of_settings_take_the_declaration():
    """A flag made by add_setting_flag has the setting's choices and default (--mtu keeps the
    original study's 300) and its help starts with the setting's meaning."""
    from lossy_hooks.study.flags import build_parser

    actions = {a.dest: a for a in build_parser(prog="train_ddp.py")._actions}
    doc = {n: s.doc.replace("%", "%%") for n, (_, s) in DECLARED.items()}  # argparse's escape
    made = [n for n in DECLARED if n in actions and actions[n].help.startswith(doc[n])]
    assert set(made) >= {"mtu", "post_sync", "packetization", "counts_transport", "encoding", "fec"}
    assert set(made) >= {"hadamard_block", "wire_dtype", "error_feedback", "protect", "retransmit"}
    assert set(made) >= {"algorithm", "ranks_per_node", "link_loss", "measure_fidelity"}
    for name in made:
        default, declared = DECLARED[name]
        assert actions[name].choices == declared.choices, name
        assert actions[name].default == (300 if name == "mtu" else default), name
    assert actions["drop_point"].choices == DECLARED["drop_point"][1].choices
    assert actions["fill"].choices == DECLARED["fill"][1].choices
