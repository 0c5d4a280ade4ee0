"""Adapted models as one `.keras` file.

A keras-hub model's attention projections are built by its blocks' `build()`
and are not in the model's config, so a config alone cannot re-create their
adapters. `apply_lora` therefore gives the adapted model a subclass of its
own class (same name, behaviour and methods) whose config is the base
model's config plus the LoRA plan: each keras_lora layer's stable path
(`keras_lora.walk`), class and LoRA arguments, and the paths of the layers
kept trainable. `keras.saving.load_model` (with keras_lora imported)
rebuilds the base model, converts the layers at those paths, freezes the
base as `apply_lora` did, and Keras then loads every weight, adapters and
optimizer state included. Without keras_lora installed, loading fails with
Keras's "Could not locate class" error naming `keras_lora>LoRAModel`.
"""

import contextlib
import os
import tempfile

import keras

from keras_lora import _keras_private
from keras_lora.convert import convert_layer
from keras_lora.convert import freeze_base
from keras_lora.layers.base import LORA_CONFIG_KEYS
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.config import LoRAConfig
from keras_lora.processes import gathered_values
from keras_lora.processes import is_main_process
from keras_lora.processes import process_count
from keras_lora.processes import wait_for_writer
from keras_lora.walk import is_weighted_leaf
from keras_lora.walk import lora_layers
from keras_lora.walk import stable_layer_paths

REGISTERED_NAME = "keras_lora>LoRAModel"
_STATE = "_keras_lora_state"
_CLASSES = {}


def lora_model_class(base_class):
    """The adapted-model subclass of `base_class` (made once per class)."""
    if base_class in _CLASSES.values():
        return base_class
    cls = _CLASSES.get(base_class)
    if cls is None:
        cls = type(
            base_class.__name__,
            (base_class,),
            {
                "__module__": __name__,
                "__qualname__": base_class.__qualname__,
                "__doc__": base_class.__doc__,
                "keras_lora_base_class": base_class,
                "get_config": _get_config,
                "from_config": classmethod(_from_config),
                "build_from_config": _build_from_config,
                "__reduce__": _reduce,
                "save": _save,
                **(
                    {"save_to_preset": _save_to_preset}
                    if hasattr(base_class, "save_to_preset")
                    else {}
                ),
            },
        )
        _keras_private.register_serializable_name(cls, REGISTERED_NAME)
        _CLASSES[base_class] = cls
    return cls


def _graph_model_class(base_class):
    """keras_lora's `base_class` (`keras.Sequential` or Keras's functional
    model class): the same model with a `save` that works in a run of
    several processes. Its config is `base_class`'s; it serializes as
    `keras_lora>Sequential` / `keras_lora>Functional`, so a loaded model
    is of this class again."""
    cls = type(
        base_class.__name__,
        (base_class,),
        {
            "__module__": __name__,
            "__qualname__": base_class.__qualname__,
            "__doc__": base_class.__doc__,
            "keras_lora_base_class": base_class,
            "__reduce__": _reduce,
            "save": _save,
        },
    )
    return keras.saving.register_keras_serializable(
        package="keras_lora", name=base_class.__name__
    )(cls)


def base_class_of(model):
    """The class `apply_lora` was given (the model's own class if plain)."""
    return getattr(type(model), "keras_lora_base_class", type(model))


def lora_plan(model):
    """The JSON-serializable LoRA plan of an adapted model.

    Returns:
        `{"layers": {stable_path: {"class": registered name, <LoRA
        arguments>}}, "trainable_layers": [stable paths]}`.
    """
    layers = {}
    kept = []
    for path, layer in stable_layer_paths(model).items():
        if isinstance(layer, LoRALayer):
            config = layer.get_config()
            layers[path] = {
                "class": keras.saving.get_registered_name(type(layer)),
                **{key: config[key] for key in LORA_CONFIG_KEYS},
            }
        elif (
            path
            and is_weighted_leaf(layer)
            and any(v.trainable for v in layer.weights)
        ):
            kept.append(path)
    return {"layers": layers, "trainable_layers": kept}


def _lora_paths_in_config(serialized, prefix="", found=None):
    """Paths of the keras_lora layers a serialized model re-creates."""
    found = set() if found is None else found
    if isinstance(serialized, list):
        for item in serialized:
            _lora_paths_in_config(item, prefix, found)
    elif isinstance(serialized, dict):
        config = serialized.get("config")
        name = config.get("name") if isinstance(config, dict) else None
        if "class_name" in serialized and isinstance(name, str):
            path = f"{prefix}/{name}" if prefix else name
            if str(serialized.get("registered_name")).startswith("keras_lora>"):
                found.add(path)
            _lora_paths_in_config(config, path, found)
        else:
            for value in serialized.values():
                _lora_paths_in_config(value, prefix, found)
    return found


def attach_plan(model):
    """Gives an adapted `model` the class whose config holds its LoRA plan,
    where its own config would not re-create every keras_lora layer (layers
    that subclassed layers build, as in keras-hub models). Functional and
    Sequential models whose adapted layers are graph nodes keep their
    config (it already holds the keras_lora layers) and get keras_lora's
    class of the same name, whose `save` works in a run of several
    processes. Models nested
    in `model` (a keras-hub task's `backbone`) get their own plan class
    the same way, so each saves, pickles and reloads on its own."""
    nested = [
        layer
        for path, layer in stable_layer_paths(model).items()
        if path and isinstance(layer, keras.Model)
    ]
    for sub in [*nested, model]:
        adapted = set(lora_layers(sub))
        if not adapted or type(sub) in GRAPH_CLASSES.values():
            continue
        try:
            config = keras.saving.serialize_keras_object(sub)
            in_config = _lora_paths_in_config(config.get("config", {}))
        except Exception:  # noqa: BLE001 - not serializable: let save say so
            continue
        if adapted - in_config:
            sub.__class__ = lora_model_class(type(sub))
        elif type(sub) in GRAPH_CLASSES:
            sub.__class__ = GRAPH_CLASSES[type(sub)]


def restore_plan(model, plan):
    """Converts the layers `plan` names and freezes the base (on load)."""
    layers = stable_layer_paths(model)
    missing = sorted(set(plan["layers"]) - set(layers))
    if missing:
        raise ValueError(
            "Cannot restore the LoRA model: the rebuilt model has no layers "
            f"at {missing[:10]}."
        )
    for path, args in plan["layers"].items():
        layer = layers[path]
        if isinstance(layer, LoRALayer):
            continue
        args = dict(args)
        lora_class = keras.saving.get_registered_object(args.pop("class"))
        for key in ("lora_a_initializer", "lora_b_initializer"):
            args[key] = keras.initializers.get(args[key])
        convert_layer(layer, lora_class, LoRAConfig(**args))
    kept = {id(layers[p]) for p in plan["trainable_layers"] if p in layers}
    freeze_base(model, kept_layers=kept)
    _keras_private.pin_quantized_policies(layers.values())


def _get_config(self):
    base = type(self).keras_lora_base_class
    return {
        "base": {
            "module": base.__module__,
            "class_name": base.__name__,
            "registered_name": keras.saving.get_registered_name(base),
            "config": base.get_config(self),
        },
        "lora": lora_plan(self),
    }


def _reduce(self):
    # Keras pickles a model as its `.keras` bytes and `cls._unpickle_model`;
    # this class is made at run time, so point pickle at keras.Model's.
    _, args = type(self).keras_lora_base_class.__reduce__(self)
    return _keras_private.unpickle_model, args


def _save(self, filepath, *args, **kwargs):
    """Saves the model as a `.keras` file (`keras.Model.save`).

    In a multi-process run call it on every process with the same
    `filepath`: variables sharded across processes (a JAX `ModelParallel`
    mesh that spans them) are gathered, and only process 0 writes the file,
    which then loads in one process with `keras.saving.load_model`.
    """
    save = type(self).keras_lora_base_class.save
    if process_count() == 1:
        return save(self, filepath, *args, **kwargs)
    variables = {id(v): v for v in self.variables}
    optimizer = getattr(self, "optimizer", None)  # unset until compile
    if optimizer is not None:
        variables.update((id(v), v) for v in optimizer.variables)
    # Collectives: every process gathers, in the same order, and runs the
    # whole save (Keras may create variables while saving, which on a mesh
    # is collective too); only process 0 writes to `filepath`, the others
    # to a scratch folder removed at once (TensorFlow's multi-worker
    # saving pattern).
    gathered = gathered_values(variables.values())
    with contextlib.ExitStack() as stack:
        if not is_main_process():
            scratch = stack.enter_context(tempfile.TemporaryDirectory())
            filepath = os.path.join(scratch, os.path.basename(str(filepath)))
        with _keras_private.host_values(gathered):
            save(self, filepath, *args, **kwargs)
    wait_for_writer("keras_lora.save")


def _save_to_preset(self, preset_dir, *args, **kwargs):
    raise ValueError(
        "`save_to_preset` cannot save a model with LoRA adapters: keras-hub's "
        "`from_preset` loads presets of its own classes only. Save "
        "`keras_lora.merge(model).save_to_preset(preset_dir)` for a preset "
        "with the adapters folded in, `model.save('model.keras')` for the "
        "LoRA model, or `keras_lora.save_adapters(model, path)` for the "
        f"adapters alone. Received: preset_dir={preset_dir!r}"
    )


def _from_config(cls, config, custom_objects=None):
    return LoRAModel.from_config(config)


def _build_from_config(self, config):
    type(self).keras_lora_base_class.build_from_config(self, config)
    plan = self.__dict__.pop(_STATE, None)
    if plan is not None:
        restore_plan(self, plan)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAModel:
    """What `keras.saving.load_model` calls for an adapted model's config.

    Not instantiated: `from_config` rebuilds the base model from its own
    config, gives it the adapted-model class and re-applies the LoRA plan
    (now if the model is built, else once Keras builds it).
    """

    @classmethod
    def from_config(cls, config):
        model = keras.saving.deserialize_keras_object(config["base"])
        # The plan class unconditionally: the model has no LoRA layers yet,
        # and must save with its plan again after loading.
        model.__class__ = lora_model_class(type(model))
        if model.built:
            restore_plan(model, config["lora"])
        else:
            model.__dict__[_STATE] = config["lora"]
        return model

    def get_config(self):  # pragma: no cover - never instantiated
        raise NotImplementedError


# Sequential and functional models adapted in their graph: made at import,
# so that loading a file finds them before any model is adapted.
GRAPH_CLASSES = {
    base: _graph_model_class(base)
    for base in (keras.Sequential, _keras_private.functional_class())
}
