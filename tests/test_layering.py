"""The package's import graph: no cycles and no upward edges (the layering of CONTRIBUTING.md).

Every module of `mobilevis_jax` is parsed with `ast` (nothing is imported, so the test is fast and
sees function-level imports too, which a runtime check of `sys.modules` would miss). An edge
`a -> b` means some statement in `a` imports `b`; `from pkg import name` is an edge to the
submodule `pkg.name` when there is one, else to `pkg`.

Layers, lowest first (a package may import only those listed for it):

    layers     <- jax / flax / numpy / stdlib only
    models     <- layers
    interop    <- layers, models, fs, torch_models (inside functions only)
    profiling  <- layers, models
    fs         <- etils / stdlib only (local or remote paths)
    data       <- data only (TensorFlow lives here)
    torch_models <- torch_models only (torch lives here)
    train      <- anything but cli; its step (train/step.py) reaches neither data nor TensorFlow

`zoo`, `cli` and the top-level facade sit above all of them.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "mobilevis_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# For each group (the first name below the package), the groups its modules may import. Groups
# absent from this table are not constrained as importers (but the table's groups may not import
# them unless listed). '' is the top-level package `mobilevis_jax` itself.
ALLOWED = {
    "layers": {"layers"},
    "models": {"layers", "models"},
    "interop": {"layers", "models", "interop", "torch_models", "fs"},
    "profiling": {"layers", "models"},
    # data may reach down to layers (the bottom layer) for its one shared helper, cvnets' batch
    # rounding = layers.make_divisible; never to models or train.
    "data": {"data", "layers"},
    "timing": set(),
    # Paths that may be local or remote (etils.epath): the stdlib and etils only.
    "fs": set(),
    # The packaged PyTorch modules: torch only, nothing of the JAX side.
    "torch_models": {"torch_models"},
}
# Third-party packages `layers` may use (besides the standard library).
LAYERS_EXTERNAL = {"jax", "flax", "numpy"}
# The jitted train step, which must not load TensorFlow or the data package, even transitively.
STEP_MODULE = "mobilevis_jax.train.step"
TENSORFLOW = {"tensorflow", "tensorflow_datasets"}


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _scan() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, Path]]:
  """(internal edges, external top-level imports, module -> file) of every package module."""
  files = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
  internal = {m: set() for m in files}
  external = {m: set() for m in files}
  for mod, path in files.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
          base = mod.split(".") if is_pkg else mod.split(".")[:-1]
          base = base[:len(base) - node.level + 1]
          if node.module:
            base.append(node.module)
          source = ".".join(base)
        else:
          source = node.module or ""
        if source == "__future__":
          continue
        targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                   for a in node.names]
      else:
        continue
      for t in targets:
        if t == PACKAGE or t.startswith(PACKAGE + "."):
          # `import a.b.c` names a module; an unknown dotted tail is an attribute of a module.
          while t not in files and "." in t:
            t = t.rsplit(".", 1)[0]
          if t != mod:
            internal[mod].add(t)
        else:
          external[mod].add(t.split(".")[0])
  return internal, external, files


INTERNAL, EXTERNAL, FILES = _scan()


def _group(mod: str) -> str:
  parts = mod.split(".")
  return parts[1] if len(parts) > 1 else ""


def _packages_above(mod: str) -> list[str]:
  parts = mod.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_the_scan_sees_the_package():
  # A broken scan (wrong root, no edges found) would make every other test pass vacuously.
  assert {"mobilevis_jax.layers.conv", "mobilevis_jax.models.registry",
          "mobilevis_jax.train.train", STEP_MODULE} <= set(FILES)
  assert "mobilevis_jax.models.registry" in INTERNAL["mobilevis_jax.models.repvit"]
  assert "tensorflow" in EXTERNAL["mobilevis_jax.data"]
  # Function-level imports count: the trainer reaches the data package only inside functions.
  assert "mobilevis_jax.data" in INTERNAL["mobilevis_jax.train.train"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          m = stack.pop()
          on_stack.discard(m)
          component.append(m)
          if m == node:
            break
        if len(component) > 1:
          out.append(sorted(component))
  return out


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  cycles = _cycles(INTERNAL)
  assert not cycles, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("group", sorted(ALLOWED))
def test_no_upward_imports(group):
  bad = []
  for mod, targets in INTERNAL.items():
    if _group(mod) != group:
      continue
    for t in sorted(targets):
      if _group(t) not in ALLOWED[group]:
        bad.append(f"{mod} -> {t}")
  assert not bad, f"{group} may import only {sorted(ALLOWED[group])} of the package: {bad}"


def test_layers_use_only_jax_flax_numpy_and_the_stdlib():
  allowed = LAYERS_EXTERNAL | set(sys.stdlib_module_names)
  bad = [f"{mod} -> {e}" for mod, ext in EXTERNAL.items() if _group(mod) == "layers"
         for e in sorted(ext - allowed)]
  assert not bad, bad


def test_the_train_step_reaches_neither_data_nor_tensorflow():
  # Transitive closure; importing a module also runs the __init__ of every package above it.
  seen, todo = set(), [STEP_MODULE]
  while todo:
    mod = todo.pop()
    if mod in seen:
      continue
    seen.add(mod)
    todo.extend(INTERNAL[mod])
    todo.extend(p for p in _packages_above(mod) if p in FILES)
  data_mods = sorted(m for m in seen if _group(m) == "data")
  tf_users = sorted(m for m in seen if EXTERNAL[m] & TENSORFLOW)
  assert not data_mods and not tf_users, (
      f"{STEP_MODULE} reaches data modules {data_mods} / TensorFlow via {tf_users}")
  assert "mobilevis_jax.train.mixup" in seen  # mixup runs inside the step


def _module_level_imports(path: Path) -> list[str]:
  names = []
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_torch_is_never_imported_at_module_level():
  # torch is an optional extra: the core package may only import it inside functions, except in
  # torch_models, the subpackage the extra is for (which nothing imports at module level).
  bad = []
  for mod, path in FILES.items():
    if _group(mod) == "torch_models":
      continue
    for node in ast.parse(path.read_text()).body:
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      bad += [f"{mod} -> {n}" for n in names if n.split(".")[0] in ("torch", "timm")]
  assert not bad, bad


def test_torch_models_is_imported_only_inside_functions():
  # `import mobilevis_jax` (and anything but torch_models itself) must not pull in torch.
  bad = [f"{mod} -> {n}" for mod, path in FILES.items() if _group(mod) != "torch_models"
         for n in _module_level_imports(path) if n.startswith(f"{PACKAGE}.torch_models")]
  assert not bad, bad
  assert "torch" in EXTERNAL["mobilevis_jax.torch_models.repvit"]  # the scan sees the subpackage


def test_fs_uses_only_etils_and_the_stdlib():
  # The path layer is imported by the trainer and interop alike; it must stay light (no
  # TensorFlow, no orbax) so that importing it never loads a framework.
  assert "mobilevis_jax.fs" in EXTERNAL and "etils" in EXTERNAL["mobilevis_jax.fs"]
  bad = sorted(EXTERNAL["mobilevis_jax.fs"] - {"etils"} - set(sys.stdlib_module_names))
  assert not bad, bad
