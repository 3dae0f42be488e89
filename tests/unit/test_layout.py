"""The package's layering (compiler below apps below the CLI, no import circles), the step-input
table, and the shared helpers that replaced their twins (atomic files, optimizer by name)."""
import ast
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.inputs import KINDS, Bindings, StepInput, step_inputs
from edgetune.compiler.optim import by_name
from edgetune.files import atomic_write, write_json
from tests.unit.nets import ConvNet, batch

PACKAGE = Path(et.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """{module: edgetune modules it imports}, top-level and function-level imports alike."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def owner(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgetune"):
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names} | {owner(node.module)}
            elif isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("edgetune")}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_compiler_never_imports_the_applications_or_the_cli():
    upward = {(m, t) for m, ts in import_graph().items() if m.startswith("edgetune.compiler")
              for t in ts if t.startswith(("edgetune.apps", "edgetune.cli", "edgetune.data"))}
    assert upward == set()


def test_every_input_of_a_compiled_step_has_a_known_kind_and_is_bound():
    trainer = et.compile(ConvNet().eval(), F.cross_entropy, *batch(), scheme={"pw.weight": 0.5, "head.*": "full"},
                         optimizer=et.SGD(lr=0.1, momentum=0.9))
    inputs = step_inputs(trainer.graph)
    assert [i.name for i in inputs] == [n.name for n in trainer.graph.inputs]
    assert {i.kind for i in inputs} == {"param", "buffer", "state", "hyper", "input", "target"}
    state = [i for i in inputs if i.kind == "state"]
    assert all(trainer.state[i.key].shape == i.shape for i in state)  # the Trainer holds each one
    assert [i.key for i in inputs if i.kind in ("input", "target")] == [0, 1]


def test_bindings_take_held_tensors_once_and_per_step_values_at_each_call():
    w = torch.zeros(2)
    inputs = [StepInput("w", "param", "fc.weight", (2,), torch.float32),
              StepInput("lr", "hyper", "lr", (), torch.float64),
              StepInput("x", "input", 0, (2,), torch.float32)]
    bindings = Bindings(inputs, {"param": {"fc.weight": w}})
    x = torch.ones(2)
    args = bindings.arguments({"hyper": {"lr": 0.5}, "input": [x]})
    assert args[0] is w and args[1] == 0.5 and args[2] is x
    with pytest.raises(KeyError, match="nothing holds the state 'fc.weight:momentum_buffer'"):
        Bindings([StepInput("m", "state", "fc.weight:momentum_buffer", (2,), torch.float32)], {"state": {}})


def test_an_input_of_unknown_kind_is_refused():
    from edgetune.compiler.ir.builder import Builder

    b = Builder()
    x = b.input("x", (2,), torch.float32, kind="mystery")
    with pytest.raises(ValueError, match=f"kind 'mystery'; known kinds: {', '.join(KINDS)}"):
        step_inputs(b.graph({"loss": x}))


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["model.bin"]
    write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_optimizer_by_name_keeps_each_optimizers_default_decay():
    assert by_name("sgd", 0.1) == et.SGD(lr=0.1, momentum=0.9)
    assert by_name("adamw", 0.1) == et.AdamW(lr=0.1)
    assert by_name("adamw", 0.1, weight_decay=0.0).weight_decay == 0.0
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        by_name("adam", 0.1)


def test_a_scheme_is_parsed_from_a_file_or_its_short_spelling(tmp_path):
    path = tmp_path / "scheme.json"
    write_json(str(path), {"head.*": "full"})
    assert et.schemes.parse(str(path)) == {"head.*": "full"}
    model = ConvNet()
    assert et.schemes.resolve(et.schemes.parse("last:2"), model) == et.schemes.resolve(et.schemes.last(2), model)
    with pytest.raises(et.schemes.SchemeError, match="last:K needs a whole number"):
        et.schemes.parse("last:x")
