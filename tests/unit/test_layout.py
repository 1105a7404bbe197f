"""The layout rules of edgemml/ (see README, "How the code is laid out"), checked from the source.

- No import cycles between edgemml modules, counting annotations-only imports under
  `if TYPE_CHECKING:` (a private helper names its stage's config through an `Any` alias).
- Every arrow points down: a module imports only modules of its own layer or below, so libraries
  never import the stage layer, and nothing below the runner imports the runner or the CLI.
- One runtime layer: nothing outside edgemml/runtimes creates an ONNX Runtime session, compiles an
  OpenVINO model or opens another runtime's artifact (benchmarks included).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from edgemml.codegraph import imports_of, package_modules

ROOT = Path(__file__).resolve().parents[2]

#: layer of each top-level module or package of edgemml (lower numbers are lower layers)
LAYERS = {
    "errors": 0,
    "config": 1, "artifacts": 1, "machine": 1, "codegraph": 1, "metrics": 1,
    "training_config": 1, "distributed": 1, "sweep": 1, "activation_names": 1,
    "arch_families": 1, "arch_capabilities": 1, "paths": 1, "yamlsafe": 1, "yamlfile": 1,
    "models": 2, "data": 2, "training": 2, "pruning": 2, "prune_rules": 2, "prune_guard": 2,
    "quantization": 2, "exporters": 2,
    "runtimes": 2, "report": 2, "evaluation": 2, "robustness": 2, "roofline": 2,
    "latency_search": 2,
    "stages": 3,
    "pipeline": 4, "progress": 4,  # pipeline/: loader, runner, fingerprint, runrecords, schema
    "cli": 5,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the edgemml package itself: its version only
    top = parts[1]
    assert top in LAYERS, f"{module}: add edgemml.{top} to LAYERS in {__file__}"
    return LAYERS[top]


MODULES = package_modules("edgemml")


def test_every_module_is_in_a_layer() -> None:
    for m in MODULES:
        _layer(m)


def test_no_upward_imports() -> None:
    upward = [f"{m} (layer {_layer(m)}) imports {dep} (layer {_layer(dep)})"
              for m in MODULES for dep in sorted(imports_of(m, explicit=True))
              if _layer(dep) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    # imports under `if TYPE_CHECKING:` count too: they never run, but a type checker and a
    # reader follow them, and the design rule is "no cycles", not "no cycles at run time"
    graph = {m: set(imports_of(m, explicit=True, typing=True)) for m in MODULES}
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_reading_imports_imports_no_third_party_module() -> None:
    """The fingerprint of a cached stage reads its imports from the source: that must not import
    the libraries named there (find_spec of `lib.sub.name` imports `lib.sub`; importing
    executorch.runtime that way made a cached re-run take 25 s instead of 2)."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgemml.codegraph import closure\n"
            "for s in ('quantize', 'export', 'validate'):\n    closure(f'edgemml.stages.{s}')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'executorch', 'litert_torch', "
            "'ai_edge_litert', 'torchao', 'onnxruntime', 'openvino', 'nncf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_layering_test_sees_a_violation(tmp_path: Path) -> None:
    """The check above is only worth something if it can fail: a library importing a stage."""
    src = "from edgemml.stages.base import StageContext\n"
    tree = ast.parse(src)
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["edgemml.stages.base"]
    assert _layer("edgemml.stages.base") > _layer("edgemml.pruning")


#: calls that open an artifact in a runtime; only edgemml/runtimes may make them
RUNTIME_CALLS = re.compile(r"\b(InferenceSession|compile_model|load_program|Interpreter)\s*\(")

#: the bundle's standalone predict.py runs where edgemml is not installed: it opens its models itself
STANDALONE = {"edgemml/exporters/predict_template.py"}


def _sources() -> list[Path]:
    files = sorted((ROOT / "edgemml").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    return [p for p in files if "runtimes" not in p.relative_to(ROOT).parts]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_runtime_layer_opens_artifacts(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in STANDALONE:
        return
    hits = [f"{rel}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if RUNTIME_CALLS.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "open artifacts through edgemml.runtimes:\n" + "\n".join(hits)


def test_runtime_call_pattern_matches_what_it_must() -> None:
    assert RUNTIME_CALLS.search("sess = ort.InferenceSession(str(p), opts)")
    assert RUNTIME_CALLS.search("core.compile_model(model, 'CPU', config)")
    assert not RUNTIME_CALLS.search("compiled_model = x")
