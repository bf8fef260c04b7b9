"""The package's dependencies run one way (docs/api.md, "Layout").

Checked on the source (imports at any depth, also inside functions), so a
late import cannot sneak a cycle in.
"""

import ast
import os

import keras_dks

ROOT = os.path.dirname(keras_dks.__file__)

# Lower layers first; a module may import only from its own or lower layers.
# `callbacks` sits low: it needs only `utils`, and SRDL's two-stage driver
# uses its SafeBackupAndRestore. `export` works on any Keras model and needs
# only `adapt` (is the output a softmax?); its CLI imports just the modules a
# .keras file names. `DKSModel.export` may delegate to it.
# Building blocks -> model -> methods -> training plumbing; the examples and
# benchmarks (scripts, outside the package) sit above all of them.
LAYERS = [
    {"utils", "losses", "draws", "optimizers", "compat", "taps", "blocks",
     "distribute", "data", "callbacks"},
    {"heads"},
    {"adapt", "backbones", "export"},
    {"model"},
    {"methods"},
    {"recipes", "plots"},
]
SCRIPTS = {"examples", "benchmarks"}


def _imports(path):
    """Every keras_dks module (or script folder) `path` imports, at any depth:
    module top, functions, methods, conditional blocks; relative imports
    resolved against the file's package."""
    tree = ast.parse(open(path).read())
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(ROOT)).split(os.sep)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            if parts[0] in SCRIPTS:
                yield parts[0]
            elif parts[0] == "keras_dks":
                if len(parts) > 1:
                    yield parts[1]
                else:
                    yield from (a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in SCRIPTS:
                    yield top
                elif a.name.startswith("keras_dks."):
                    yield a.name.split(".")[1]
                elif a.name == "keras_dks":
                    yield "keras_dks"  # the whole package: above every layer


def _layer(module):
    if module in SCRIPTS or module == "keras_dks":
        return len(LAYERS)
    for k, layer in enumerate(LAYERS):
        if module in layer:
            return k
    raise AssertionError(f"keras_dks.{module} is in no layer; add it to LAYERS and to docs/api.md")


def test_dependencies_run_one_way():
    bad = []
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py") or f == "__init__.py" and dirpath == ROOT:
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
            module = rel.split(os.sep)[0].removesuffix(".py")
            for dep in _imports(os.path.join(dirpath, f)):
                if dep != module and _layer(dep) > _layer(module):
                    bad.append(f"{rel} imports keras_dks.{dep}")
    assert not bad, bad


def test_data_imports_nothing_from_methods():
    for f in os.listdir(os.path.join(ROOT, "data")):
        if f.endswith(".py"):
            deps = set(_imports(os.path.join(ROOT, "data", f)))
            assert deps <= {"data"}, (f, deps)


def test_every_library_module_has_its_test_module():
    # Top-level modules and packages, and each method of `methods/`
    # (`kd`'s frozen teacher is tested with the registry, in test_methods).
    tests = os.path.dirname(os.path.abspath(__file__))
    modules = {f.removesuffix(".py") for f in os.listdir(ROOT)
               if f.endswith(".py") and f != "__init__.py" or
               os.path.isfile(os.path.join(ROOT, f, "__init__.py"))}
    modules |= {f.removesuffix(".py") for f in os.listdir(os.path.join(ROOT, "methods"))
                if f.endswith(".py") and f not in ("__init__.py", "kd.py")}
    missing = sorted(m for m in modules
                     if not os.path.exists(os.path.join(tests, f"test_{m}.py")))
    assert not missing, f"modules without tests/test_<module>.py: {missing}"


def test_tests_named_in_the_docs_exist():
    # The README and the docs/ pages cite tests as `test_x.py::test_y`.
    import re

    repo = os.path.dirname(ROOT)
    broken = []
    docs = sorted(f for f in os.listdir(os.path.join(repo, "docs")) if f.endswith(".md"))
    for doc in ["README.md"] + [os.path.join("docs", f) for f in docs]:
        text = open(os.path.join(repo, doc)).read()
        for module, name in set(re.findall(r"(test_\w+\.py)::(\w+)", text)):
            path = os.path.join(repo, "tests", module)
            if not (os.path.exists(path) and re.search(rf"def {name}\b", open(path).read())):
                broken.append(f"{doc}: {module}::{name}")
    assert not broken, broken
