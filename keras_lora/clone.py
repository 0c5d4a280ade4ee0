"""Cloning a Keras model without copying its weights.

`apply_lora`, `merge` and `unload` return new model objects. They are built
from the model's serialized config (so the clone has the same class, call
signature and methods, keras-hub tasks included) while every variable
creation is answered with the original model's variable of the same path:
the clone shares the weights, and building it allocates no weight memory.
"""

import contextlib
import warnings

import keras

from keras_lora import _keras_private

_DEFAULT_HINT = "Use `apply_lora(..., inplace=True)`."


class _VariableIndex:
    """Finds a model's variable for a path the clone asks for.

    Paths usually agree exactly; they can differ by leading scopes (a
    `Sequential` built at construction names `sequential/dense/kernel` what
    its deserialized twin names `dense/kernel`), so a unique match on whole
    trailing path components is accepted too.
    """

    def __init__(self, variables, hint=_DEFAULT_HINT):
        self.exact = {}
        self.suffixes = {}
        for variable in variables:
            other = self.exact.setdefault(variable.path, variable)
            if other is not variable:
                raise ValueError(
                    "Cannot clone the model without copying: two variables "
                    f"share the path {variable.path!r}. {hint}"
                )
            parts = variable.path.split("/")
            for i in range(1, len(parts)):
                key = "/".join(parts[i:])
                self.suffixes.setdefault(key, []).append(variable)
        self.used = set()

    def find(self, path):
        candidates = []
        if path in self.exact:
            candidates = [self.exact[path]]
        elif len(self.suffixes.get(path, [])) == 1:
            candidates = self.suffixes[path]
        else:
            parts = path.split("/")
            for i in range(1, len(parts)):
                variable = self.exact.get("/".join(parts[i:]))
                if variable is not None:
                    candidates = [variable]
                    break
        if len(candidates) != 1 or id(candidates[0]) in self.used:
            return None
        self.used.add(id(candidates[0]))
        return candidates[0]


@contextlib.contextmanager
def _reusing_variables(index, values_by_path, created):
    """While active, `Layer.add_weight` returns the model's variable found by
    `index` for the new variable's path, or (for paths in `values_by_path`)
    a new variable holding the given value; other new variables are listed
    in `created`."""
    original_add_weight = keras.layers.Layer.add_weight

    def add_weight(self, *args, **kwargs):
        name = kwargs.get("name")
        with keras.name_scope(self.name, caller=self):
            path = f"{_keras_private.current_path()}/{name}"
        variable = index.find(path)
        if variable is None:
            variable = original_add_weight(self, *args, **kwargs)
            created.append(variable.path)
            return variable
        shape = kwargs.get("shape", args[0] if args else None)
        if shape is not None and tuple(shape) != tuple(variable.shape):
            raise ValueError(
                f"Cannot share variable {variable.path!r}: the clone asks "
                f"for shape {tuple(shape)}, the model has "
                f"{tuple(variable.shape)}."
            )
        if variable.path in values_by_path:
            value = values_by_path[variable.path]
            kwargs["initializer"] = lambda shape, dtype=None: value
            return original_add_weight(self, *args, **kwargs)
        _keras_private.track_variable(self, variable)
        return variable

    keras.layers.Layer.add_weight = add_weight
    try:
        yield
    finally:
        keras.layers.Layer.add_weight = original_add_weight


def clone_model_sharing_variables(
    model, values=None, config_transform=None, hint=_DEFAULT_HINT
):
    """Returns a new model of `model`'s class that shares its variables.

    Args:
        model: a built `keras.Model` whose `get_config` rebuilds it (functional,
            sequential, keras-hub tasks and backbones, subclassed models with
            `get_config`). A keras-hub task's preprocessor is reused as is.
        values: optional `{variable_path: array}`; these variables are new in
            the clone and hold the given values (used by `merge`).
        config_transform: optional function applied to the serialized model
            (a dict) before it is deserialized (used by `merge` to turn
            keras_lora layer configs into their base layer configs).
        hint: str, what the error tells the user to do instead when the
            model cannot be cloned.

    Returns:
        The clone, built and, if `model` was compiled, compiled alike.

    Raises:
        ValueError: if `model` has two different variables with one path, or
            the clone creates variables that `model` does not have (e.g. a
            subclassed model whose config does not rebuild it exactly).
    """
    index = _VariableIndex(model.weights, hint)
    serialized = keras.saving.serialize_keras_object(model)
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None and "preprocessor" in serialized["config"]:
        # Tokenizer vocabularies are assets, not config: keep the object.
        serialized["config"]["preprocessor"] = None
    if config_transform is not None:
        serialized = config_transform(serialized)
    created = []
    with (
        _reusing_variables(index, values or {}, created),
        warnings.catch_warnings(),
    ):
        # keras-hub tasks compile themselves in __init__; Keras warns that
        # their custom `compile()` is not re-run from the compile config.
        warnings.filterwarnings(
            "ignore", message=".*compile\\(\\)` was not called"
        )
        clone = keras.saving.deserialize_keras_object(serialized)
        if not clone.built and model.built:
            build_config = model.get_build_config()
            if build_config:
                clone.build_from_config(build_config)
    if created:
        raise ValueError(
            "Cannot clone the model without copying: rebuilding it from its "
            f"config creates variables it does not have: {created[:10]} "
            "(e.g. a layer shared by two nested models, which a config "
            f"rebuild duplicates). {hint}"
        )
    if preprocessor is not None and "preprocessor" in serialized["config"]:
        with _keras_private.unlocked(clone):
            clone.preprocessor = preprocessor
    return clone
