"""No import cycle between the package's modules (deferred imports inside functions count too).

lint-imports checks the layers; its layers contract does not see a cycle between two modules of
one package (checkpoint/convert.py <-> checkpoint/llava.py, as there once was), so this test
walks the whole import graph that grimp (import-linter's engine) builds. About 3 s.
"""

import grimp
from conftest import REPO  # noqa: F401  (puts the repository first on sys.path)


def module_cycles(graph) -> list[list[str]]:
    """For each direct import a -> b that closes a loop, the shortest chain b -> ... -> a."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append([importer, *back])
    return cycles


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph("megatron_apriel", cache_dir=None)
    assert len(graph.modules) > 60
    assert module_cycles(graph) == []


def test_a_cycle_is_found(tmp_path, monkeypatch):
    """The check sees a cycle made by an import inside a function."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg.a import x\n")
    (pkg / "c.py").write_text("import cyclepkg.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclepkg", cache_dir=None)
    assert sorted(map(tuple, module_cycles(graph))) == [("cyclepkg.a", "cyclepkg.b", "cyclepkg.a"),
                                                        ("cyclepkg.b", "cyclepkg.a", "cyclepkg.b")]
