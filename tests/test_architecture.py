"""The import graph keeps its shape: arrows only point down the layers, and nothing imports itself in a circle."""

from __future__ import annotations

from tests import import_graph as g


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    edges = g.graph()
    assert "sae.sparse_adam" in edges["sae.sparse_step"]  # top level
    assert "harvest.lm" in edges["harvest.harvester"]  # relative (from .lm import ...)
    assert any(t.startswith("kernels.") for t in edges["sae.sparse_step"])  # inside a function


def test_no_arrow_points_up_the_layers():
    assert g.upward_arrows(g.graph()) == []


def test_no_module_imports_itself_through_a_circle():
    assert g.circles(g.graph()) == []


def test_the_checks_find_what_they_look_for():
    edges = {"kernels.a": {"sae.b"}, "sae.b": {"sae.c"}, "sae.c": {"sae.b"}, "bench.x": {"sae.b"}}
    assert g.upward_arrows(edges) == ["kernels.a -> sae.b"]
    assert g.circles(edges) == [["sae.b", "sae.c"]]
