"""The rank arithmetic of composed parallelisms (lossy_hooks/study/mesh.py), against its
definition r(d, s, t) = (d pp + s) tp + t and ep blocks of replicas, with no process group."""

from __future__ import annotations

import itertools

import pytest

from lossy_hooks.study.mesh import GROUP_KINDS, MeshShape

SHAPES = [
    MeshShape(1),
    MeshShape(4, tp=2),
    MeshShape(4, pp=2),
    MeshShape(4, ep=2),
    MeshShape(4, tp=2, pp=2),
    MeshShape(8, tp=2, ep=2),
    MeshShape(24, tp=2, pp=3, ep=2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_kind_partitions_the_world_into_groups_that_differ_in_one_coordinate(shape):
    """Each kind's groups are disjoint, cover the world, have the kind's size, and their
    ranks agree in every coordinate but the kind's (ep: the same block g; expert replicas:
    the same position i in their blocks)."""
    size = {
        "tp": shape.tp,
        "pp": shape.pp,
        "dp": shape.dp,
        "ep": shape.ep,
        "expert_replica": shape.dp // shape.ep,
    }
    for kind in GROUP_KINDS:
        groups = shape.groups(kind)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(shape.world)), kind
        assert {len(g) for g in groups} == {size[kind]}, kind
        for g in groups:
            coords = [shape.coords(r) for r in g]
            d, s, t = zip(*coords, strict=True)
            block = {dd // shape.ep for dd in d}
            position = {dd % shape.ep for dd in d}
            same = {
                "tp": (d, s),
                "pp": (d, t),
                "dp": (s, t),
                "ep": (s, t, tuple(block)),
                "expert_replica": (s, t, tuple(position)),
            }[kind]
            assert all(len(set(c)) == 1 for c in same), (kind, g)
            for r in g:
                assert shape.group_index(kind, r) == groups.index(g)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rank_and_coords_invert_each_other_tp_innermost(shape):
    ranks = [
        shape.rank(d, s, t)
        for d, s, t in itertools.product(range(shape.dp), range(shape.pp), range(shape.tp))
    ]
    assert ranks == list(range(shape.world))  # d outermost, then s, then t
    assert [shape.coords(r) for r in ranks] == list(
        itertools.product(range(shape.dp), range(shape.pp), range(shape.tp))
    )


@pytest.mark.parametrize("kind", ["tp", "pp", "ep"])
def test_one_parallelism_keeps_the_layout_and_seeds_of_before(kind):
    """With one model parallelism its groups are consecutive ranks and a group's index (its
    traffic seed) is rank // size, as before composition existed (a run's loss sequence
    unchanged)."""
    shape = MeshShape(6, **{kind: 3})
    assert shape.groups(kind) == [[0, 1, 2], [3, 4, 5]]
    assert [shape.group_index(kind, r) for r in range(6)] == [r // 3 for r in range(6)]


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(world=6, tp=4), "--tp 4 must divide the world size 6 (W = dp x tp)"),
        (dict(world=3, pp=2), "--pp 2 must divide the world size 3 (W = dp x pp)"),
        (dict(world=6, tp=2, pp=2), "--tp 2 x --pp 2 = 4 must divide the world size 6 (W = dp x pp x tp)"),
        (dict(world=3, ep=2), "--ep 2 must divide the world size 3"),
        (dict(world=4, tp=2, ep=4), "--ep 4 must divide the data-parallel size 2 (W / (tp x pp) = 4 / 2)"),
        (dict(world=4, tp=0), "--tp must be >= 1, got 0"),
    ],
)
def test_shapes_that_do_not_tile_the_world_are_refused_naming_the_flags(sizes, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")):
        MeshShape(**sizes)
    with pytest.raises(ValueError, match="unknown group kind 'xx'"):
        MeshShape(2).groups("xx")
