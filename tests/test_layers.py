"""The package's layers have walls: a module imports only from its own layer or those below it,
the schema imports nothing of the package, and the report (which reads files only) imports the
schema and nothing else of the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import condense

PACKAGE = Path(condense.__file__).parent
# Bottom to top; a module may import from its own layer and any layer before it.
LAYERS = ("schema", "primitives", "method", "stages", "app")


def layer_of(module: str) -> str:
    """'condense.method.distance' -> 'method'; the report and the package root stand apart."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def package_imports(path: Path) -> set[str]:
    """Every condense module a file imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("condense"):
            if node.module == "condense":  # from condense import schema
                found |= {f"condense.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("condense")}
    return {m for m in found if m != "condense" and layer_of(m) in LAYERS}


def modules() -> list[tuple[str, Path]]:
    return [
        ("condense." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts), p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and "conf" not in p.relative_to(PACKAGE).parts
    ]


def test_every_module_sits_in_a_layer() -> None:
    stray = [m for m, _ in modules() if layer_of(m) not in (*LAYERS, "report", "__main__")]
    assert not stray, f"modules outside the layers: {stray}"


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = []
    for module, path in modules():
        own = layer_of(module)
        if own not in LAYERS:
            continue
        for imported in package_imports(path):
            if LAYERS.index(layer_of(imported)) > LAYERS.index(own):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_schema_imports_nothing_and_report_only_the_schema() -> None:
    assert package_imports(PACKAGE / "schema.py") == set()
    assert package_imports(PACKAGE / "report.py") == {"condense.schema"}


def test_importing_the_report_loads_only_the_schema() -> None:
    """The report reads files: in a fresh interpreter it loads no stage, method or primitive."""
    code = "import sys, condense.report; print(sorted(m for m in sys.modules if m.startswith('condense')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['condense', 'condense.report', 'condense.schema']"


def test_importing_the_schema_loads_no_other_package_module() -> None:
    """In a fresh interpreter, so nothing imported by other tests can hide an import."""
    code = "import sys, condense.schema; print(sorted(m for m in sys.modules if m.startswith('condense')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['condense', 'condense.schema']"


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a primitive importing a stage is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from condense.stages.evaluation import evaluate_set\n")
    assert package_imports(bad) == {"condense.stages.evaluation"}
    assert LAYERS.index(layer_of("condense.stages.evaluation")) > LAYERS.index("primitives")
