"""The house has no circle: no module of the project imports one that imports it back, directly or through
others, counting the imports made inside functions (the way a circle hides)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_imports():
    """module name -> the project's modules it imports anywhere in its code."""
    files = [*ROOT.glob("yolo/*.py"), *ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("tools/*.py")]
    names = {".".join(part for part in file.relative_to(ROOT).with_suffix("").parts if part != "__init__"): file
             for file in files}
    graph = {}
    for name, file in names.items():
        imported = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {module for module in imported if module in names and module != name}
    return graph


def cycle_through(graph, start):
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for child in graph[node]:
            if child == start:
                return [*path, start]
            if child not in seen:
                seen.add(child)
                stack.append((child, [*path, child]))
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = project_imports()
    assert {"yolo", "yolo.api", "yolo.inference", "yolo.onnx_model", "train"} <= set(graph)
    assert "yolo.onnx_model" in graph["yolo.api"]  # the lazy import inside open_detector is seen
    cycles = [cycle for name in sorted(graph) if (cycle := cycle_through(graph, name))]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_check_finds_a_circle():
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}, "a") is None
