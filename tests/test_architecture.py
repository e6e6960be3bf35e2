"""The package's architecture, checked: topics below, commands on top, no circle of imports.

Each module of ``minillm`` sits on one floor; a module may import from its own floor or below, never above,
and no set of modules imports itself round a circle. The README's architecture section draws these floors.
Imports under ``if TYPE_CHECKING:`` are for annotations only and do not count.
"""

from __future__ import annotations

import ast
import pathlib

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "minillm"

# Bottom to top: what a newcomer reads first is lowest.
FLOORS = [
    # foundations: errors, files, devices, process groups and sharding, configs, plots, timing, metrics, the chapter
    # 01-02 math, fp16 loss scaling
    {"minillm", "files", "device", "distributed", "fully_sharded", "config", "plots", "timing", "metrics", "gradcheck",
     "linreg", "optim", "loss_scaling"},
    # data and text: readers, cleaning, batching, tokenizers, checkpoints
    {"data", "data.cleaning", "data.padding", "data.lm_blocks", "data.masking", "data.nsp", "datasets", "tokenization",
     "checkpoint", "hpsearch"},
    # the parts of a Transformer, and the small models of chapters 02-05
    {"attention", "layers", "hf", "bow", "reversal", "number_words"},
    # the models; what training them holds in memory, and activation checkpointing of their blocks; a model split
    # over processes: its blocks (tensor parallelism), its layers (pipeline stages); a model in int8
    {"gpt", "bert", "transformer", "activation_checkpointing", "tensor_parallel", "pipeline_parallel", "memory",
     "quantization", "batched_generation"},
    # the training loop and the run folders it writes
    {"runs", "train"},
    # what is trained: pretraining, fine-tuning, parameter-efficient methods, contrastive learning, the reference
    {"pretrain", "bert_pretraining", "finetune", "peft", "contrastive", "nanogpt"},
    # deployment (chapter 12): any run loaded for inference, evaluated, quantized, distilled, exported, served (and
    # the load test against a server)
    {"inference_runs", "evaluation", "generation_speed", "onnx_export", "distillation", "serving", "load_test"},
    # commands (python -m minillm ...): thin layers over everything below
    {"commands", "commands.bench", "commands.evaluate", "commands.export", "commands.finetune", "commands.generate",
     "commands.notebooks", "commands.pipeline", "commands.serve", "__main__"},
]
FLOOR = {name: index for index, names in enumerate(FLOORS) for name in names}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(part for part in parts if part != "__init__")
    return name or "minillm"


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: pathlib.Path) -> set[str]:
    """The minillm modules ``path`` imports at run time (module level or inside functions), by floor name."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minillm":
            if node.module == "minillm":  # from minillm import data, runs, MinillmError
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                    found.add(alias.name if is_module else "minillm")
            else:
                found.add(node.module.removeprefix("minillm."))
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("minillm.") for alias in node.names if alias.name.startswith("minillm."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(module_name(path))
    return found


GRAPH = {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    assert set(GRAPH) == set(FLOOR), "give a new module its floor in FLOORS (and in the README's picture)"


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [f"{name} (floor {FLOOR[name]}) imports {dep} (floor {FLOOR[dep]})"
              for name, deps in GRAPH.items() for dep in sorted(deps) if FLOOR[dep] > FLOOR[name]]
    assert not upward, "\n".join(upward)


def test_only_the_entry_point_imports_commands():
    importers = {name for name, deps in GRAPH.items() for dep in deps if dep.startswith("commands")}
    assert importers <= {"__main__", "commands"} | {name for name in GRAPH if name.startswith("commands.")}


def test_there_is_no_circle_of_imports():
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for dep in sorted(GRAPH[name]):
            assert state.get(dep) != "open", "circle of imports: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                walk(dep)
        path.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            walk(name)


def test_the_models_need_no_training_data_or_run_folders():
    """gpt, bert and transformer are readable (and usable) on their own: no loop, no data sets, no runs."""
    for model in ("gpt", "bert", "transformer", "hf", "layers", "attention"):
        assert not GRAPH[model] & {"train", "runs", "datasets", "data", "tokenization", "checkpoint"}, model


def test_chapters_import_topics_never_commands():
    """A chapter script reads top to bottom over topic modules; commands are for the terminal."""
    for script in sorted((REPO_ROOT / "chapters").glob("ch[0-9][0-9]_*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in modules if m.startswith("minillm.commands") or m == "minillm.__main__"}, script.name
