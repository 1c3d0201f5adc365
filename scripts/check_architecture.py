#!/usr/bin/env python3
"""Measure the architecture goals of sparks_tvm (issue 18) on the source tree, statically.

- import cycles between the project's modules, two ways:
  * run time: imports executed when a module is imported (module level, not under
    ``if TYPE_CHECKING``), plus the parent packages every ``import a.b.c`` executes first;
  * design: every import statement (in functions too, and ``TYPE_CHECKING`` ones), without
    the parent-package edges -- a module that merely lives in a package does not use it;
- module line counts, function line counts (the ``def`` line to the last line of the body);
- imports of the project's own modules made inside functions.

Usage: ``python scripts/check_architecture.py [--json] [--check]``. ``--check`` exits 1 when a
goal is missed; ``tests/test_architecture.py`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The project's import packages.
PACKAGES = ("sparks_tvm", "relay_passes", "schedules")
#: Where the size goals apply. ``sparks_tvm/torch`` (the training side) is measured but reported
#: apart: it is not part of the compiler's layers.
SIZE_EXEMPT = ("sparks_tvm/torch/",)
#: Modules allowed to import the project inside functions (the CLI's commands import lazily).
INFUNC_EXEMPT = ("sparks_tvm/cli.py",)

#: Layers, lowest first: a module may import its own layer and those below, never above.
#: Ground floor: the kernels (TE computes, bit encoding, numpy references) and the data
#: types every layer shares; middle: graph passes and schedules; top: the user API.
LAYERS = (
    ("ground", ("sparks_tvm.kernels", "sparks_tvm.errors", "sparks_tvm.cost", "sparks_tvm.report")),
    ("middle", ("relay_passes", "schedules")),
    ("top", ("sparks_tvm",)),
)

GOALS = {"max_module_lines": 600, "max_function_lines": 80, "max_infunction_project_imports": 15,
         "max_cycles": 0}


def _modules() -> dict:
    """``{dotted module name: path relative to ROOT}`` for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)
                parts = rel[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = rel.replace(os.sep, "/")
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Yield ``(node, in_function, type_checking)`` for every import statement."""

    def walk(node, in_func, tc):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_func, tc
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, True, tc)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from walk(child, in_func, True)
            else:
                yield from walk(child, in_func, tc)

    yield from walk(tree, False, False)


def _targets(node, module: str, is_pkg: bool, modules: dict) -> list:
    """Project modules an import statement names (``from a import b`` names ``a.b`` if a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = []
        for a in node.names:
            sub = f"{prefix}.{a.name}"
            names.append(sub if sub in modules else prefix)
    out = []
    for name in names:
        # The longest project module the name starts with (``import a.b.c`` -> a.b.c).
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return out


def _parents(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return len(LAYERS)


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (or with a self edge)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def _functions(tree: ast.AST):
    """Yield ``(qualified name, lines)`` of every function and method."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                yield prefix + child.name, child.end_lineno - start + 1
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def measure() -> dict:
    modules = _modules()
    runtime, design = {}, {}
    infunc, module_lines, function_lines = [], {}, []
    for name, rel in modules.items():
        with open(os.path.join(ROOT, rel)) as fh:
            text = fh.read()
        tree = ast.parse(text, rel)
        is_pkg = rel.endswith("__init__.py")
        runtime[name], design[name] = set(), set()
        for node, in_func, tc in _imports(tree):
            for tgt in _targets(node, name, is_pkg, modules):
                if tgt != name:
                    design[name].add(tgt)
                if not in_func and not tc:
                    runtime[name].update(p for p in _parents(tgt) + [tgt] if p != name and p not in _parents(name))
            targets = sorted(set(_targets(node, name, is_pkg, modules)))
            if targets and in_func and not rel.startswith(INFUNC_EXEMPT):
                infunc.append(f"{rel}:{node.lineno} {', '.join(targets)}")
        exempt = rel.startswith(SIZE_EXEMPT)
        module_lines[rel] = (len(text.splitlines()), exempt)
        for fname, lines in _functions(tree):
            function_lines.append((rel, fname, lines, exempt))
    upward = sorted(f"{a} -> {b}" for a, deps in design.items() for b in deps
                    if _layer(b) > _layer(a) and b != "sparks_tvm" or (b == "sparks_tvm" and _layer(a) < 2))
    long_modules = sorted(((r, n) for r, (n, ex) in module_lines.items() if n > GOALS["max_module_lines"] and not ex),
                          key=lambda t: -t[1])
    long_functions = sorted(((r, f, n) for r, f, n, ex in function_lines if n > GOALS["max_function_lines"] and not ex),
                            key=lambda t: -t[2])
    counted = [(r, n) for r, (n, ex) in module_lines.items() if not ex]
    return {
        "modules": len(modules),
        "runtime_cycles": _cycles(runtime),
        "design_cycles": _cycles(design),
        "upward_imports": upward,
        "largest_module": max(counted, key=lambda t: t[1]),
        "modules_over_limit": long_modules,
        "largest_function": max(((r, f, n) for r, f, n, ex in function_lines if not ex), key=lambda t: t[2]),
        "functions_over_limit": long_functions,
        "infunction_project_imports": infunc,
        "exempt_functions_over_limit": sorted(((r, f, n) for r, f, n, ex in function_lines
                                               if n > GOALS["max_function_lines"] and ex), key=lambda t: -t[2]),
    }


def failures(m: dict) -> list:
    out = []
    if len(m["runtime_cycles"]) > GOALS["max_cycles"]:
        out.append(f"run-time import cycles: {m['runtime_cycles']}")
    if len(m["design_cycles"]) > GOALS["max_cycles"]:
        out.append(f"design import cycles: {m['design_cycles']}")
    if m["upward_imports"]:
        out.append(f"imports of a higher layer: {m['upward_imports']}")
    if m["modules_over_limit"]:
        out.append(f"modules over {GOALS['max_module_lines']} lines: {m['modules_over_limit']}")
    if m["functions_over_limit"]:
        out.append(f"functions over {GOALS['max_function_lines']} lines: {m['functions_over_limit']}")
    if len(m["infunction_project_imports"]) > GOALS["max_infunction_project_imports"]:
        out.append(f"{len(m['infunction_project_imports'])} in-function project imports "
                   f"(goal <= {GOALS['max_infunction_project_imports']})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    args = ap.parse_args(argv)
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(f"modules: {m['modules']}")
        print(f"run-time import cycles: {len(m['runtime_cycles'])} {m['runtime_cycles']}")
        print(f"design import cycles:   {len(m['design_cycles'])} {m['design_cycles']}")
        print(f"imports of a higher layer ({' < '.join(n for n, _ in LAYERS)}): {len(m['upward_imports'])}")
        for item in m["upward_imports"]:
            print(f"    {item}")
        print(f"largest module: {m['largest_module'][0]} ({m['largest_module'][1]} lines); "
              f"over {GOALS['max_module_lines']}: {len(m['modules_over_limit'])}")
        print(f"largest function: {m['largest_function'][0]}:{m['largest_function'][1]} "
              f"({m['largest_function'][2]} lines); over {GOALS['max_function_lines']}: "
              f"{len(m['functions_over_limit'])}")
        for r, f, n in m["functions_over_limit"]:
            print(f"    {n:4d}  {r}:{f}")
        print(f"in-function project imports (outside {', '.join(INFUNC_EXEMPT)}): "
              f"{len(m['infunction_project_imports'])}")
        for item in m["infunction_project_imports"]:
            print(f"    {item}")
        if m["exempt_functions_over_limit"]:
            print(f"(not counted, {', '.join(SIZE_EXEMPT)}: {len(m['exempt_functions_over_limit'])} functions over "
                  f"{GOALS['max_function_lines']} lines)")
    bad = failures(m)
    if args.check and bad:
        for line in bad:
            print("FAIL: " + line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
