"""Imports run one way: every import of an evoray module, including those inside functions, goes
to a lower layer (or, in the layers marked shared, to a peer), and no module imports a private
name (``_x``) of another.

The layers, lowest first::

    errors < storage < faults < config < data < models, lora, ray_utils < tasks
      < features | select | train < generate < stages < evolve, select_cmd
      < tune_space, tune_trial, tune_report < tune < report_run < report < demo < cli

Two places differ from the first plan of this order, on purpose:

* ``storage`` (files on paths and URIs) sits under ``config``, which reads a YAML config from any
  URI; ``data`` writes its records through it too.
* ``faults`` (fault injection at stage boundaries, on only through environment variables) sits
  just above ``storage``: the stage runner of ``stages`` consults it, and it needs nothing else.
* ``tune_report`` (the sweep's tables) sits under ``tune`` with the sweep's other parts, its
  search space and resources (``tune_space``) and its trials (``tune_trial``): ``tune`` is the
  driver that runs them and writes the tables at the end; none of the three imports another.

``models``, ``lora`` and ``ray_utils`` may import each other (``lora`` loads a base model;
``ray_utils`` passes the trust-remote-code setting to Ray workers). ``features``, ``select`` and
``train`` never import each other: what they share (the LoRA config, adapter files, the Adam-state
format) lives in ``lora``.
"""

import ast
import pathlib

import evoray

LAYERS = [("errors",), ("storage",), ("faults",), ("config",), ("data",),
          ("models", "lora", "ray_utils"), ("tasks",), ("features", "select", "train"),
          ("generate",), ("stages",), ("evolve", "select_cmd"),
          ("tune_space", "tune_trial", "tune_report"), ("tune",), ("report_run",), ("report",),
          ("demo",), ("cli",)]
PEERS_MAY_IMPORT = {("models", "lora", "ray_utils")}
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
ROOT = pathlib.Path(evoray.__file__).parent


def _unit(module: str) -> str | None:
    """``evoray.features.stage`` -> ``features``; the package root -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "evoray" and len(parts) > 1 else None


def _imports():
    """``(file, line, importer unit, imported module, imported names)`` for every import of an
    evoray module in the package."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        me = _unit(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [(node.module, [a.name for a in node.names])]
            else:
                continue
            for module, names in found:
                if module == "evoray" or module.startswith("evoray."):
                    yield f"{rel}.py", node.lineno, me, module, names


def test_every_unit_has_a_layer():
    units = {_unit(".".join(p.relative_to(ROOT.parent).with_suffix("").parts))
             for p in ROOT.rglob("*.py")} - {None, "__init__"}
    assert units - set(RANK) == set(), "give the new module a layer in LAYERS"


def test_imports_go_down():
    wrong = []
    for where, line, me, module, _ in _imports():
        them = _unit(module)
        if me in (None, "__init__") or them is None or them == me:
            continue
        if RANK[them] > RANK[me] or (RANK[them] == RANK[me] and
                                     LAYERS[RANK[me]] not in PEERS_MAY_IMPORT):
            wrong.append(f"{where}:{line}: {me} imports {module}")
    assert wrong == []


def test_no_private_names_across_modules():
    wrong = [f"{where}:{line}: {module}.{n}" for where, line, me, module, names in _imports()
             for n in names if n.startswith("_") and not n.startswith("__")
             and _unit(module) != me]
    assert wrong == []
