"""The project's layers, read from every module's imports (ast, function-level imports included): the LoRA core,
the features beside it, the data, the training machinery, the tools and the product on top, the entry points
last. A module imports its own layer and those below it; the core imports nothing of the project but itself;
no library module imports a script (an entry point under scripts/ may drive train.py's recipe, as tests do);
and no modules import each other in a cycle."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "infer", "serve", "bench"}
CORE = {"lora", "lora.layer", "lora.dora", "lora.pissa", "lora.model", "lora.save", "lora.load", "lora.files"}
LAYERS = [  # bottom first
    ("core", lambda m: m in CORE),
    ("features", lambda m: m in {"lora.adapters", "lora.multi_layer", "lora.named_adapter_io", "lora.nf4"}),
    ("data", lambda m: m.split(".")[0] == "data"),
    ("machinery", lambda m: m.split(".")[0] == "support"),
    ("tools", lambda m: m in {"lora.inspect", "lora.testing", "lora.experiments"}),
    ("product", lambda m: m.split(".")[0] in ("banking", "serving", "benchmarks")),
    ("entry points", lambda m: m in SCRIPTS or m.split(".")[0] == "scripts"),
]
# What the core may import from outside the project.
CORE_THIRD_PARTY = {"torch", "safetensors", "transformers", "numpy"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name: file} of every module the project ships (tests and docs aside)."""
    modules = {}
    for path in [*root.glob("*.py"), *root.glob("*/*.py")]:
        if path.parts[len(root.parts)] in ("tests", "docs", "shared"):
            continue
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports, top-level or not, as dotted names (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from lora import model` imports lora.model
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the project's modules it imports}."""
    modules = project_modules(root)
    return {name: {m for m in imports_of(name, path) if m in modules and m != name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    matches = [index for index, (_, member) in enumerate(LAYERS) if member(module)]
    assert len(matches) == 1, f"{module} belongs to {len(matches)} layers: give it one in LAYERS"
    return matches[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, each as the modules around it (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    """Every import that breaks the layers, in words."""
    graph, modules = import_graph(root), project_modules(root)
    problems = [f"import cycle: {' <-> '.join(cycle)}" for cycle in cycles(graph)]
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target in SCRIPTS and layer_of(module) < len(LAYERS) - 1:
                problems.append(f"{module} imports the script {target}")
            elif layer_of(target) > layer_of(module):
                problems.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    for module in sorted(m for m in modules if m in CORE):
        outside = (
            {name.split(".")[0] for name in imports_of(module, modules[module]) if not name.startswith("lora")}
            - CORE_THIRD_PARTY
            - set(sys.stdlib_module_names)
            - {"__future__"}
        )
        problems += [f"the core's {module} imports {name}" for name in sorted(outside)]
    return problems


def test_every_module_belongs_to_one_layer():
    for module in project_modules():
        layer_of(module)


def test_the_layers_hold():
    """No import cycle, nothing the core imports from outside it, no import of a higher layer or a script."""
    assert layer_violations() == []


@pytest.mark.parametrize(
    "module, added, expected",
    [
        ("lora/layer.py", "from support import cli", "the core's lora.layer imports support"),
        ("data/batches.py", "import support.cli", "data.batches (data) imports support.cli (machinery)"),
        ("support/cli.py", "import train", "support.cli imports the script train"),
        ("benchmarks/epoch.py", "from infer import main", "benchmarks.epoch imports the script infer"),
        ("lora/layer.py", "from .pissa import pissa_init", "import cycle: lora.layer <-> lora.pissa"),
    ],
)
def test_an_import_against_the_layers_is_found(tmp_path, module, added, expected):
    """The check itself: a copy of the tree with one import added where it breaks a rule."""
    import shutil

    for path in project_modules().values():
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
    (tmp_path / module).write_text((tmp_path / module).read_text() + f"\n{added}\n")
    assert any(expected in problem for problem in layer_violations(tmp_path)), layer_violations(tmp_path)


def test_importing_the_core_loads_the_core_alone():
    """`import lora` loads LoRA's own modules, none of the features, the data, the machinery or the product."""
    import subprocess

    ours = ("lora", "support", "data", "banking", "benchmarks")
    code = f"import sys, lora; print(sorted(m for m in sys.modules if m.split('.')[0] in {ours}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(eval(result.stdout)) == CORE  # noqa: S307 (our own subprocess's list of names)


def test_plain_injection_installs_no_hook_and_replaces_no_method():
    """inject_lora swaps layers and nothing else: the several-adapter machinery is not the single adapter's."""
    from helpers import toy_t5

    from lora import inject_lora

    model = toy_t5()
    inject_lora(model, ("q", "v"), r=4, alpha=8)
    hooks = [(name, m) for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooks == []
    assert "generate" not in vars(model) and "forward" not in vars(model)
    assert all("forward" not in vars(module) for module in model.modules())
