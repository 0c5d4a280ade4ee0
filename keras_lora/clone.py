"""Cloning a Keras model without copying its weights.

`apply_lora`, `merge` and `unload` return new model objects. They are built
from the model's serialized config (so the clone has the same class, call
signature and methods, keras-hub tasks included). Each variable creation is
first answered with the original model's variable of the same name path (so
most variables are never allocated); then every layer of the clone is given
the original's variables at the same stable path (`keras_lora.walk`: the
structure Keras's saving library walks, never auto-generated names), with
shape checks. Variables created where Keras auto-numbered a name differently
are allocated while the clone is built and freed once replaced.
"""

import warnings

import keras

from keras_lora import _keras_private
from keras_lora.walk import stable_layer_paths

_DEFAULT_HINT = "Use `apply_lora(..., inplace=True)`."


class _VariableIndex:
    """Proposes the model's variable for a path the clone asks for.

    Only a fast first guess while the clone is built, so that most
    variables are never allocated: paths usually agree exactly, or by
    trailing components (a `Sequential` built at construction names
    `sequential/dense/kernel` what its deserialized twin names
    `dense/kernel`). Paths that two variables share, or that Keras
    auto-numbered differently in the clone, get no guess; the structural
    matching after the build (`_share_structurally`) decides every variable.
    """

    def __init__(self, variables):
        self.exact = {}
        self.ambiguous = set()
        self.suffixes = {}
        for variable in variables:
            other = self.exact.setdefault(variable.path, variable)
            if other is not variable:
                self.ambiguous.add(variable.path)
            parts = variable.path.split("/")
            for i in range(1, len(parts)):
                key = "/".join(parts[i:])
                self.suffixes.setdefault(key, []).append(variable)
        for path in self.ambiguous:
            del self.exact[path]
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


def _reusing_variables(index, values, stand_ins):
    """A scope in which `Layer.add_weight` returns the model's variable that
    `index` proposes for the new variable's path, or (for variables in
    `values`, keyed by `id`) a new variable holding the given value, listed
    in `stand_ins` as `{id(new): id(original)}`; paths without a proposal
    get a new variable."""

    def provide(self, create, args, kwargs):
        name = kwargs.get("name")
        with keras.name_scope(self.name, caller=self):
            path = f"{_keras_private.current_path()}/{name}"
        variable = index.find(path)
        if variable is None:
            return create(self, *args, **kwargs)
        shape = kwargs.get("shape", args[0] if args else None)
        if shape is not None and tuple(shape) != tuple(variable.shape):
            return create(self, *args, **kwargs)
        if id(variable) in values:
            value = values[id(variable)]
            kwargs["initializer"] = lambda shape, dtype=None: value
            new = create(self, *args, **kwargs)
            stand_ins[id(new)] = id(variable)
            return new
        # Track it in the list (trainable or not) a new variable would go
        # to, so the clone's variable order is what a fresh build gives
        # (Keras's weight files address variables by that order).
        frozen = variable.trainable
        variable.trainable = kwargs.get("trainable", True)
        _keras_private.track_variable(self, variable)
        variable.trainable = frozen
        return variable

    return _keras_private.providing_weights(provide)


def _base_variables(layer):
    """A layer's own variables in Keras's saving order, without adapters."""
    adapters = set()
    if hasattr(layer, "adapter_weights") and layer.built:
        adapters = {id(v) for v in layer.adapter_weights().values()}
        adapters |= {id(v) for v in layer.initial_weights().values()}
    return [
        v for v in _keras_private.own_variables(layer) if id(v) not in adapters
    ]


def _pairs(mine, theirs):
    """Pairs a clone layer's variables with the model layer's: by name when
    the names are unique in both (the trainable / non-trainable split of
    Keras's lists depends on the flags at tracking time), else by order."""
    names = [v.name for v in mine]
    if len(set(names)) == len(names) and sorted(names) == sorted(
        v.name for v in theirs
    ):
        by_name = {v.name: v for v in theirs}
        return [(v, by_name[v.name]) for v in mine]
    return list(zip(mine, theirs, strict=True))


def _all_layers(model, walked):
    """The layers under `model`: its tracked sub-layers at any depth, and
    `walked` (its stable paths' layers, already computed)."""
    seen = {}
    stack = [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen[id(layer)] = layer
        stack.extend(_keras_private.sublayers(layer))
    for layer in walked:
        seen.setdefault(id(layer), layer)
    return list(seen.values())


def _rebuild_layer(path, layer, source, values, swaps, problems):
    """A clone layer whose variables differ from the model layer's (a
    quantized layer rebuilt in float): the variables named in `values` take
    those values, the others share the model's variable of the same name
    and shape."""
    theirs = {v.name: v for v in _base_variables(source)}
    for mine in _base_variables(layer):
        if mine.name in values:
            mine.assign(values[mine.name])
            continue
        other = theirs.get(mine.name)
        if other is None or tuple(other.shape) != tuple(mine.shape):
            problems.append(f"{path}/{mine.name}: no such variable to share")
        elif other is not mine:
            swaps[id(mine)] = other


def _share_structurally(
    model, clone, originals, copies, values, stand_ins, hint, rebuilt
):
    """Makes every clone layer hold the model's variable at the same stable
    path (`keras_lora.walk`; `originals` and `copies` are the two models'
    `stable_layer_paths`), with shape checks; variables in `values` get
    a new variable of the clone holding the value instead; layers in
    `rebuilt` (by id of the model's layer) get their own variables
    (`_rebuild_layer`)."""
    shared = {id(v) for v in model.weights}
    swaps = {}
    problems = []
    for path, layer in copies.items():
        mine_all = _base_variables(layer)
        source = originals.get(path)
        if source is not None and id(source) in rebuilt:
            _rebuild_layer(
                path, layer, source, rebuilt[id(source)], swaps, problems
            )
            continue
        remat = (
            _keras_private.remat_mode(source) if source is not None else None
        )
        if remat:
            # Not in the config: a RematScope's mode is carried over.
            _keras_private.set_remat_mode(layer, remat)
        theirs_all = _base_variables(source) if source is not None else []
        if len(mine_all) != len(theirs_all):
            problems.append(
                f"{path or '<model>'}: {len(mine_all)} variables in the "
                f"rebuilt model, {len(theirs_all)} in the model"
            )
            continue
        for mine, theirs in _pairs(mine_all, theirs_all):
            if tuple(mine.shape) != tuple(theirs.shape):
                problems.append(
                    f"{path}/{theirs.name}: shape {tuple(mine.shape)} in the "
                    f"rebuilt model, {tuple(theirs.shape)} in the model"
                )
                continue
            if id(theirs) in values:
                if stand_ins.get(id(mine)) == id(theirs):
                    continue
                value = values[id(theirs)]
                if id(mine) in stand_ins or id(mine) not in shared:
                    mine.assign(value)
                    stand_ins[id(mine)] = id(theirs)
                else:
                    new = keras.Variable(
                        value,
                        dtype=theirs.dtype,
                        trainable=theirs.trainable,
                        name=theirs.name,
                    )
                    swaps[id(mine)] = new
                    stand_ins[id(new)] = id(theirs)
            elif mine is not theirs:
                swaps[id(mine)] = theirs
    if swaps:
        # Every layer of the clone, not only the owner: a layer may hold a
        # sub-layer's variable too (tied weights, cached references).
        layers = _all_layers(clone, copies.values())
        for layer in layers:
            _keras_private.replace_variables(layer, swaps)
        for layer in layers:
            _keras_private.refresh_torch_params(layer)
    missing = [
        p
        for p, layer in originals.items()
        if p not in copies and _base_variables(layer)
    ]
    if missing:
        problems.append(f"layers missing from the rebuilt model: {missing}")
    if problems:
        raise ValueError(
            "Cannot clone the model without copying: rebuilding it from its "
            f"config gives a different structure: {problems[:10]}. {hint}"
        )


def _keep_quantizers(originals, copies):
    """Gives each quantized layer of the clone its original's input
    quantizer and quantization config, which a keras-hub model's config
    does not hold: rebuilt from it, Keras 3.15 gives an int4
    `ReversibleEmbedding` an int8 input quantizer the original (quantized by
    `model.quantize("int4")`) does not have, and the logits change (a
    `.keras` save and load of such a model changes them the same way).
    `originals` and `copies` are the two models' `stable_layer_paths`."""
    for path, layer in originals.items():
        mine = copies.get(path)
        if mine is None or getattr(layer, "quantization_mode", None) is None:
            continue
        for attr in ("inputs_quantizer", "quantization_config"):
            if hasattr(layer, attr):
                object.__setattr__(mine, attr, getattr(layer, attr))


def clone_model_sharing_variables(
    model,
    values=None,
    config_transform=None,
    hint=_DEFAULT_HINT,
    rebuilt=None,
):
    """Returns a new model of `model`'s class that shares its variables.

    Args:
        model: a built `keras.Model` whose `get_config` rebuilds it (functional,
            sequential, keras-hub tasks and backbones, subclassed models with
            `get_config`). A keras-hub task's preprocessor is reused as is.
        values: optional `{id(variable): array}` for variables of `model`
            that are new in the clone and hold the given values (used by
            `merge`).
        config_transform: optional function applied to the serialized model
            (a dict) before it is deserialized (used by `merge` to turn
            keras_lora layer configs into their base layer configs).
        hint: str, what the error tells the user to do instead when the
            model cannot be cloned.
        rebuilt: optional `{id(layer): {variable name: value}}` for layers
            of `model` whose clone has other variables (`config_transform`
            changed them, e.g. a quantized layer made float): the clone's
            variables of those names are new and hold the values, its others
            share the layer's variables of the same name.

    Returns:
        The clone, built and, if `model` was compiled, compiled alike.

    Raises:
        ValueError: if the clone's structure differs from `model`'s (a layer
            or variable that `model` lacks or has with another shape, e.g. a
            subclassed model whose config does not rebuild it exactly).
    """
    return clone_with_layer_paths(
        model, values, config_transform, hint, rebuilt
    )[0]


def clone_with_layer_paths(
    model,
    values=None,
    config_transform=None,
    hint=_DEFAULT_HINT,
    rebuilt=None,
    originals=None,
):
    """`clone_model_sharing_variables`, also returning the clone's
    `stable_layer_paths` (computed for the clone anyway).

    `originals`: optional `stable_layer_paths(model)` the caller already
    has, walked on `model` as it is now (unchanged since); the model is then
    not walked again.

    Returns:
        `(clone, stable_layer_paths(clone))`.
    """
    rebuilt = rebuilt or {}
    own = {
        id(v)
        for layer in _all_layers(model, ())
        if id(layer) in rebuilt
        for v in _base_variables(layer)
        if v.name in rebuilt[id(layer)]
    }
    # A rebuilt layer's replaced variables are never proposed to the clone.
    index = _VariableIndex([v for v in model.weights if id(v) not in own])
    # Building the clone may set flags on the shared variables (a layer's
    # `trainable` setter reaches its variables): restore them afterwards.
    flags = [(v, v.trainable) for v in model.weights]
    serialized = keras.saving.serialize_keras_object(model)
    if config_transform is not None:
        serialized = config_transform(serialized)
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None and "preprocessor" in serialized["config"]:
        # Tokenizer vocabularies are assets, not config: keep the object.
        serialized["config"]["preprocessor"] = None
    values = values or {}
    stand_ins = {}
    try:
        with (
            _reusing_variables(index, values, stand_ins),
            warnings.catch_warnings(),
        ):
            # keras-hub tasks compile themselves in __init__; Keras warns
            # that their custom `compile()` is not re-run from the config.
            warnings.filterwarnings(
                "ignore", message=".*compile\\(\\)` was not called"
            )
            clone = keras.saving.deserialize_keras_object(serialized)
            if not clone.built and model.built:
                build_config = model.get_build_config()
                if build_config:
                    clone.build_from_config(build_config)
        if originals is None:
            originals = stable_layer_paths(model)
        copies = stable_layer_paths(clone)
        _share_structurally(
            model, clone, originals, copies, values, stand_ins, hint, rebuilt
        )
        _keras_private.pin_quantized_policies(_all_layers(clone, ()))
        _keep_quantizers(originals, copies)
    finally:
        for variable, trainable in flags:
            variable.trainable = trainable
    if preprocessor is not None and "preprocessor" in serialized["config"]:
        with _keras_private.unlocked(clone):
            clone.preprocessor = preprocessor
    return clone, copies
