"""Architecture rules checked on the source: no import circle between autocp's modules
(lazy imports inside functions included) and no ``_private`` name imported across files."""

import ast
import os

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = [("autocp", "autocp"), ("autocp.passes", "passes"), ("autocp.kernels", "kernels")]
PACKAGE_NAMES = {"autocp", "autocp.passes", "autocp.kernels", "autocp.ops", "autocp.models"}


def _modules():
    mods = {}
    for pkg, d in PACKAGES:
        for dp, _, fs in os.walk(os.path.join(ROOT, d)):
            for f in fs:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dp, f), os.path.join(ROOT, d))[:-3].replace(os.sep, ".")
                if pkg == "autocp" and rel.split(".")[0] in ("passes", "kernels"):
                    continue
                name = pkg if rel == "__init__" else pkg + "." + rel.replace(".__init__", "")
                mods[name] = os.path.join(dp, f)
    return mods


def _imports():
    """(import graph, [(importer, module, private name)])"""
    mods = _modules()
    g, private = nx.DiGraph(), []
    for name, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read())
        base = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                tgt = ".".join(parts + ([node.module] if node.module else []))
            else:
                tgt = node.module or ""
            if not tgt.startswith("autocp"):
                continue
            for a in node.names:
                full = tgt + "." + a.name
                t = full if full in mods else tgt
                if t in mods and t != name:
                    g.add_edge(name, t)
                if t == tgt and a.name.startswith("_") and not a.name.startswith("__"):
                    private.append((name, tgt, a.name))
    return g, private


def test_scan_sees_the_package():
    g, _ = _imports()
    assert g.has_edge("autocp.passes.shard", "autocp.passes.attention")
    assert len(g) > 30


def test_no_import_circle():
    g, _ = _imports()
    cycles = [c for c in nx.simple_cycles(g) if len(c) > 1 and not (set(c) & PACKAGE_NAMES)]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_no_private_name_imported_across_files():
    _, private = _imports()
    assert not private, "private names imported across files: " + ", ".join(f"{a} imports {m}.{n}" for a, m, n in private)
