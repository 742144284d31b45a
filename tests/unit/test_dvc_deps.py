"""dvc.yaml: each stage's code deps are exactly the project modules its command can run.

For every stage, the modules its `imagegen <command>` handler imports are followed through every
import statement of the project's code, the ones inside functions included (stages import heavy
modules lazily, so importing a module and reading sys.modules would miss them). Each module reached
must be covered by a dep of the stage (the file, or a folder above it), and each code dep must cover
at least one module reached, and all of a folder dep's modules: a change to code a stage runs re-runs
it, a change to code it does not run leaves it alone.

Not deps: src/imagegen/cli.py, the dispatcher every stage shares (parse, load params, call the
stage function, print its summary; no stage output depends on it), and package __init__ files that
hold no code (checked below).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from imagegen.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DISPATCHER = "src/imagegen/cli.py"


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = SRC / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_names(tree: ast.AST, package: str):
    """Every module an import statement anywhere in `tree` may load (`from a import b`: a and a.b)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def reached_files(entry: set[str]) -> set[Path]:
    """The project's module files reached from `entry`, with the package __init__ files Python runs."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = list(entry)
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("imagegen"):
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:  # an attribute, e.g. imagegen.config.Config
            continue
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += imported_names(ast.parse(path.read_text()), package)
    return files


def entry_modules(command: str) -> set[str]:
    """What the command's handler imports, plus the dispatcher's own module-level imports."""
    handler = ast.parse(textwrap.dedent(inspect.getsource(COMMANDS[command].run)))
    cli = ast.parse((SRC / "imagegen" / "cli.py").read_text())
    top = ast.Module(body=[n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    return {*imported_names(handler, "imagegen"), *imported_names(top, "imagegen"), "imagegen.config"}


def has_code(path: Path) -> bool:
    """Anything beyond a docstring and constant assignments."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue
        return True
    return False


def covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def test_no_dynamic_imports_escape_the_walk():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "import_module(" not in text and "__import__(" not in text, f"{path}: extend test_dvc_deps"


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_code_deps_are_exactly_the_code_it_runs(stage):
    spec = stages()[stage]
    program, command = spec["cmd"].split()[:2]
    assert program == "imagegen" and command in COMMANDS
    files = {str(p.relative_to(ROOT)) for p in reached_files(entry_modules(command))}
    for init in [f for f in files if f.endswith("__init__.py")]:
        assert not has_code(ROOT / init), f"{init} holds code: make it a dep of the stages that import it"
        files.discard(init)
    code_deps = [d for d in spec["deps"] if d.startswith("src/")]
    uncovered = sorted(f for f in files if not any(covers(d, f) for d in code_deps))
    assert not uncovered, f"stage {stage} runs {uncovered}, which no dep covers"
    assert DISPATCHER not in code_deps
    for dep in code_deps:
        under = {str(p.relative_to(ROOT)) for p in (ROOT / dep).rglob("*.py")} if (ROOT / dep).is_dir() else {dep}
        under = {f for f in under if not f.endswith("__init__.py") or has_code(ROOT / f)}
        assert under and under <= files, f"stage {stage}: dep {dep} covers {sorted(under - files)}, which it never runs"


def test_walk_finds_what_an_import_loads():
    """The walk is a superset of what importing the stage modules loads (sanity check of the walk itself)."""
    entry = sorted(m for m in entry_modules("train-gan") if module_file(m))
    code = f"import sys; [__import__(m) for m in {entry!r}]; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(SRC), "PATH": ""}).stdout.split()
    files = {module_file(m) for m in loaded if m.startswith("imagegen") and module_file(m)}
    walked = reached_files(entry_modules("train-gan"))
    assert files and files <= walked
    assert SRC / "imagegen" / "tracking.py" in walked - files  # imported inside a function only
