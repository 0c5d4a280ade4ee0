"""The package's structure, checked on its source (docs/architecture.md).

- No import cycle between keras_lora's modules, counting imports inside
  functions too.
- `keras_lora/layers/` imports nothing else of keras_lora (except the
  private-API module), so the layers stand alone.
- Keras's private API only in `keras_lora/_keras_private.py`: no other
  module imports `keras.src`, or reads an underscore attribute that
  keras_lora does not define itself.
- No module imports another module's private names.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_lora"
PRIVATE_API = "keras_lora._keras_private"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {
        _module_name(path): (path, ast.parse(path.read_text()))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _imports(tree, modules):
    """`[(imported module, imported name or None)]` of keras_lora modules."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "keras_lora"
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    found.append((sub, None))
                else:
                    found.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [
                (a.name, None)
                for a in node.names
                if a.name.startswith("keras_lora")
            ]
    return found


def _graph():
    modules = _modules()
    return {
        name: {
            target
            for target, _ in _imports(tree, modules)
            if target != name and target != "keras_lora" and target in modules
        }
        for name, (_, tree) in modules.items()
    }


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert _cycle(_graph()) is None


def test_layers_stand_alone():
    graph = _graph()
    layers = {m for m in graph if m.startswith("keras_lora.layers")}
    assert "keras_lora.layers.layout" in layers
    for module in layers:
        outside = {
            t
            for t in graph[module]
            if not t.startswith("keras_lora.layers") and t != PRIVATE_API
        }
        assert not outside, (module, outside)


def test_keras_private_api_only_in_its_module():
    modules = _modules()
    defined = set()
    for name, (_, tree) in modules.items():
        if name == PRIVATE_API:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(
                node.ctx, ast.Store
            ):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    violations = []
    for name, (path, tree) in modules.items():
        if name == PRIVATE_API:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [getattr(node, "module", None) or ""]
                names += [a.name for a in node.names]
                if any(n.startswith("keras.src") for n in names):
                    violations.append((path.name, node.lineno, "keras.src"))
            attribute = None
            if isinstance(node, ast.Attribute):
                attribute = node.attr
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None)
                in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                attribute = node.args[1].value
            if (
                isinstance(attribute, str)
                and attribute.startswith("_")
                and not attribute.startswith("__")
                and attribute not in defined
            ):
                violations.append((path.name, node.lineno, attribute))
    assert not violations, violations


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    violations = [
        (name, target, imported)
        for name, (_, tree) in modules.items()
        for target, imported in _imports(tree, modules)
        if imported
        and imported.startswith("_")
        and not imported.startswith("__")
        and target != name
    ]
    assert not violations, violations


def test_weight_providers_are_scoped_to_their_thread_and_nest():
    """`providing_weights` changes `add_weight` only in its own context
    (another thread building a layer meanwhile gets Keras's behaviour),
    and an inner scope falls through to the outer one."""
    import threading

    import keras
    import numpy as np

    from keras_lora._keras_private import providing_weights

    calls = []

    def outer(layer, create, args, kwargs):
        calls.append(("outer", kwargs.get("name")))
        return create(layer, *args, **kwargs)

    def inner(layer, create, args, kwargs):
        calls.append(("inner", kwargs.get("name")))
        return create(layer, *args, **kwargs)

    other = {}
    with providing_weights(outer):
        thread = threading.Thread(
            target=lambda: other.update(
                layer=keras.layers.Dense(2, use_bias=False).build((None, 3))
            )
        )
        thread.start()
        thread.join()
        assert calls == []  # the other thread's kernel
        with providing_weights(inner):
            keras.layers.Dense(2, use_bias=False).build((None, 3))
    assert calls == [("inner", "kernel"), ("outer", "kernel")]
    layer = keras.layers.Dense(2, use_bias=False)
    layer.build((None, 3))
    assert calls == [("inner", "kernel"), ("outer", "kernel")]
    assert np.asarray(layer.kernel).shape == (3, 2)


def test_public_functions_have_type_hints():
    import inspect

    import keras_lora

    for name in keras_lora.__all__:
        obj = getattr(keras_lora, name)
        if inspect.isfunction(obj):
            signature = inspect.signature(obj)
            assert signature.return_annotation is not inspect.Signature.empty, (
                name
            )
            first = next(iter(signature.parameters.values()))
            assert first.annotation is not inspect.Parameter.empty, name
