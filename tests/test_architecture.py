"""The house rules of src/qoptim, read from the source with ast (nothing is imported)."""

import ast
import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
LONG_FILES_ALLOWED: dict[str, str] = {}  # path under src/ -> reason; keep it empty
LAYERS = ("quant", "kernels", "paging", "optim", "cli")  # each may import its own layer or lower ones
FACADE = {"qoptim", "qoptim.functional", "qoptim.utils", "qoptim.__main__"}  # may import anything
BACKENDS = re.compile(r"qoptim\.kernels\.(cpu|triton)(?=[._]|$)")  # as packages, or today's cpu_*/triton_* modules
# A function may import optional dependencies where they are used: the cuda and demo extras, POSIX's resource.
# qoptim's own lazy loading goes through its registries (importlib and a module path), not import statements.
OPTIONAL_DEPENDENCIES = {"triton", "tqdm", "matplotlib", "resource"}
LAZY_QOPTIM_IMPORTS: dict[str, str] = {}  # module -> reason, for qoptim imports inside its functions; keep it empty
PRIVATE_NAMES_ALLOWED = {"qoptim.optim.ademamix._ReferenceAdEMAMix": "bitsandbytes' own name for it, kept for drop-in use"}


class Import(NamedTuple):
    line: int
    target: str  # the module imported (for `from package import module`, that module)
    name: str | None  # the name taken from it, if that is not a module
    local: str  # the name the import binds
    bound: str | None  # the module bound to that name (None: not a module)
    inside_function: bool


def _parse(folder: str) -> dict[str, tuple[Path, ast.Module]]:
    def key(p: Path) -> str:  # src: the module's name; tests and benchmarks: the file's path
        parts = p.relative_to(ROOT / "src").with_suffix("").parts if folder == "src" else [str(p.relative_to(ROOT))]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    return {key(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted((ROOT / folder).rglob("*.py"))}


SRC = _parse("src")
OTHERS = {**_parse("tests"), **_parse("benchmarks")}


def _imports(module: str, tree: ast.Module):
    package = module if SRC.get(module, (Path(),))[0].name == "__init__.py" else module.rpartition(".")[0]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        inside = id(node) in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                yield Import(node.lineno, a.name, None, a.asname or top, a.name if a.asname else top, inside)
        elif isinstance(node, ast.ImportFrom):
            source = ".".join(filter(None, (package.rsplit(".", node.level - 1)[0] if node.level else "", node.module)))
            for a in node.names:
                sub = f"{source}.{a.name}"
                module_taken = sub in SRC  # `from package import module`
                yield Import(node.lineno, sub if module_taken else source, None if module_taken else a.name,
                             a.asname or a.name, sub if module_taken else None, inside)  # fmt: skip


def _graph() -> dict[str, set[str]]:
    return {m: {i.target for i in _imports(m, tree) if i.target in SRC and i.target != m} for m, (_, tree) in SRC.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        todo += graph[todo.pop()] - seen
        seen |= set(todo)
    return seen


def _listed(offenders) -> str:
    return "".join(f"\n    {o}" for o in sorted(set(offenders), key=lambda o: re.sub(r"\d+", lambda d: d[0].zfill(6), o)))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_source_file_is_over_400_lines():
    lines = {str(p.relative_to(ROOT / "src")): len(p.read_text().splitlines()) for p, _ in SRC.values()}
    long = [f"{path}: {n}" for path, n in lines.items() if n > MAX_LINES and path not in LONG_FILES_ALLOWED]
    assert not long, f"files over {MAX_LINES} lines (split them, one idea per file):{_listed(long)}"


def test_no_import_cycles():
    graph = _graph()
    reach = {m: _reach(graph, m) for m in graph}
    cycles = {" <-> ".join(sorted(o for o in reach[m] if m in reach[o])) for m in graph if m in reach[m]}
    assert not cycles, f"import cycles (imports inside functions included):{_listed(cycles)}"


def test_functions_import_only_optional_dependencies():
    def allowed(module: str, target: str) -> bool:
        top = target.split(".")[0]
        return top in OPTIONAL_DEPENDENCIES or (top == "qoptim" and module in LAZY_QOPTIM_IMPORTS)

    found = [f"{m}:{i.line} imports {i.target}" for m, (_, tree) in SRC.items() for i in _imports(m, tree)
             if i.inside_function and not allowed(m, i.target)]  # fmt: skip
    assert not found, f"imports inside functions (import at the top; lazy loading goes through a registry):{_listed(found)}"


def _private_uses(where: str, module: str, tree: ast.Module):
    """`from x import _y`, `x._y` and `setattr(x, "_y", ...)` for qoptim modules x other than ``module``."""
    imports = [i for i in _imports(module, tree) if i.target.split(".")[0] == "qoptim" and i.target != module]
    yield from (f"{where}:{i.line} from {i.target} import {i.name}" for i in imports if i.name and _private(i.name))
    aliases = {i.local: i.bound for i in imports if i.bound}

    def resolve(expr):  # the qoptim module an expression names, if any
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id)
        base = resolve(expr.value) if isinstance(expr, ast.Attribute) else None
        return f"{base}.{expr.attr}" if base and f"{base}.{expr.attr}" in SRC else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            owner, name = node.args[0], node.args[1].value  # setattr(module, "_x", ...), monkeypatch.setattr(...)
        elif isinstance(node, ast.Attribute):
            owner, name = node.value, node.attr
        else:
            continue
        if isinstance(name, str) and _private(name) and resolve(owner) not in (None, module):
            yield f"{where}:{node.lineno} {resolve(owner)}.{name}"


def test_no_private_name_crosses_a_module_boundary():
    found = [use for m, (_, tree) in SRC.items() for use in _private_uses(m, m, tree)]
    found += [use for path, (_, tree) in OTHERS.items() for use in _private_uses(path, "", tree)]
    found = [use for use in found if use.split()[-1] not in PRIVATE_NAMES_ALLOWED]
    assert not found, f"private names used from another module (make them public in a small module):{_listed(found)}"


def test_layers_point_down():
    outside = [m for m in SRC if m not in FACADE and (m.count(".") < 1 or m.split(".")[1] not in LAYERS)]
    assert not outside, f"modules in none of the layers {LAYERS}:{_listed(outside)}"
    layer = {m: len(LAYERS) if m in FACADE else LAYERS.index(m.split(".")[1]) for m in SRC}
    up = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets if m not in FACADE and layer[t] > layer[m]]
    assert not up, f"imports pointing up the layers {' -> '.join(LAYERS)}:{_listed(up)}"


def test_cpu_and_triton_backends_do_not_import_each_other():
    side = {m: BACKENDS.match(m)[1] for m in SRC if BACKENDS.match(m)}
    found = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets if m in side and side.get(t, side[m]) != side[m]]
    assert not found, f"kernels.cpu and kernels.triton import each other:{_listed(found)}"


def test_no_name_is_used_undefined():
    """pyflakes over the source, tests and benchmarks: a name used but never bound (an import
    dropped in a refactor) fails here, not on the one test path that reaches it."""
    from pyflakes import api, messages, reporter

    class Undefined(reporter.Reporter):
        def __init__(self):
            super().__init__(None, None)
            self.found = []

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                self.found.append(str(message))

        def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 (pyflakes' name)
            self.found.append(f"{filename}:{lineno}: {msg}")

    found = Undefined()
    api.checkRecursive([str(ROOT / folder) for folder in ("src", "tests", "benchmarks", "scripts")], found)
    assert not found.found, "\n".join(found.found)
