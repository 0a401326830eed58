"""The house's rules, checked on the code itself: imports run downward only, and no module imports itself back.

Rooms, lowest first: whisper_ft (the model and its I/O) and lora (torch only) -> data -> training, scoring,
transcription -> research -> the command-line scripts at the top level. Imports inside functions count too.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("whisper_ft", "lora", "data", "training", "scoring", "transcription", "research")
CLIS = ("train", "evaluate", "export", "tune", "transcribe")
# what each room may import besides itself
ALLOWED = {
    "whisper_ft": set(),
    "lora": set(),
    "data": {"whisper_ft"},
    "training": {"whisper_ft", "lora", "data"},
    "scoring": {"whisper_ft", "lora", "data"},
    "transcription": {"whisper_ft", "lora", "data", "scoring"},
    "research": {"whisper_ft", "lora", "data", "training", "scoring"},
}


def _modules() -> dict:
    """{dotted module name: file path} of every product module."""
    out = {name: os.path.join(ROOT, f"{name}.py") for name in CLIS}
    for pkg in PACKAGES:
        for fn in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if fn.endswith(".py"):
                out[f"{pkg}.{fn[:-3]}" if fn != "__init__.py" else pkg] = os.path.join(ROOT, pkg, fn)
    return out


def _imports(name: str, path: str, modules: dict) -> set:
    """The product modules `name` imports (relative imports resolved; `from pkg import mod` names the module)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_package_imports_only_rooms_below_it():
    upward = []
    for name, deps in _graph().items():
        room = name.split(".")[0]
        if room in CLIS:
            continue
        upward += [f"{name} -> {d}" for d in sorted(deps) if d.split(".")[0] not in ALLOWED[room] | {room}]
    assert not upward, "imports that run upward or sideways: " + ", ".join(upward)


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above would pass on an empty graph: check they catch what they are for."""
    fake = {"whisper_ft.a": {"training.b"}, "training.b": {"whisper_ft.a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    import pytest

    with pytest.raises(AssertionError, match="training.b"):
        test_every_package_imports_only_rooms_below_it()
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle()


def test_the_graph_holds_the_known_imports():
    graph = _graph()
    assert "training.checkpoint" in graph["training.state"]
    assert "whisper_ft.decoding" in graph["scoring.evaluation"]
    assert "research.report" in graph["research.study"]  # `from research import report as ...`


def test_model_room_holds_no_training_scoring_or_research_code():
    names = set(os.listdir(os.path.join(ROOT, "whisper_ft")))
    for word in ("study", "report", "metric", "checkpoint", "augment", "robust", "evaluation", "training"):
        assert not [n for n in names if word in n], f"whisper_ft/ holds {word} code"


def _function_lengths(path) -> dict:
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_the_recipe_and_the_loop_stay_readable():
    """train.py's main reads as the recipe (<= 40 lines), the loop is one function (<= 80), and no function of
    the command-line scripts grows past 80 lines."""
    train = _function_lengths("train.py")
    assert train["main"] <= 40 and train["train"] <= 80, {k: train[k] for k in ("main", "train")}
    for script in ("train.py", "evaluate.py", "export.py", "transcribe.py"):
        long = {k: v for k, v in _function_lengths(script).items() if v > 80}
        assert not long, f"{script}: {long}"
