"""Small configurations of every keras-hub backbone class, for the tests.

Each part module (`text.py`, `decoders.py`, `vision.py`, `multimodal.py`)
defines `CASES`: `{class_name: Case}`. A `Case` builds a small, randomly
initialised backbone of the real keras-hub class and a batch of inputs for
it; sizes are chosen so every layer matters (hidden sizes of at least 8, so
layer norms do not flatten the output) and a forward pass takes well under
a second on a CPU.
"""

import dataclasses
from collections.abc import Callable

#: keras_hub.models names that are base classes, not models.
NOT_MODELS = {"FeaturePyramidBackbone"}


@dataclasses.dataclass(frozen=True)
class Case:
    """A backbone factory and its inputs.

    Attributes:
        build: `() -> keras_hub.models.<X>Backbone`, a new model each call.
        inputs: `() -> input structure` (NumPy arrays) for that model.
        slow: bool, True for cases that take more than a few seconds.
        note: str, anything a reader of the test results should know.
        needs: `{backend: module}`, a module keras-hub itself imports to run
            this model on that backend (not a dependency of keras_lora).
    """

    build: Callable
    inputs: Callable
    slow: bool = False
    note: str = ""
    needs: dict = dataclasses.field(default_factory=dict)


def all_cases():
    """`{class_name: Case}` over every part module."""
    from hub_zoo import decoders
    from hub_zoo import multimodal
    from hub_zoo import text
    from hub_zoo import vision

    cases = {}
    for module in (text, decoders, vision, multimodal):
        overlap = set(cases) & set(module.CASES)
        assert not overlap, overlap
        cases.update(module.CASES)
    return cases


def family_of(name):
    """The part module of a case: text, decoders, vision or multimodal."""
    from hub_zoo import decoders
    from hub_zoo import multimodal
    from hub_zoo import text
    from hub_zoo import vision

    for module in (text, decoders, vision, multimodal):
        if name in module.CASES:
            return module.__name__.rsplit(".", 1)[1]
    raise KeyError(name)


def default_targets_summary(lora_model):
    """What the default targets adapted in `lora_model`, as docs state it.

    The attention layer names (`query`, `value`, ...) when the LoRA paper's
    rule applied, else the classes of the adapted layers.
    """
    import keras_lora
    from keras_lora.apply import DEFAULT_ATTENTION_NAMES
    from keras_lora.walk import stable_layer_paths

    names = set()
    for path, layer in stable_layer_paths(lora_model).items():
        if isinstance(layer, keras_lora.LoRALayer):
            attribute = path.rsplit("/", 1)[-1]
            names.add(
                layer.name
                if layer.name in DEFAULT_ATTENTION_NAMES
                else attribute
            )
    layers = keras_lora.lora_layers(lora_model).values()
    if names <= set(DEFAULT_ATTENTION_NAMES):
        return ", ".join(f"`{n}`" for n in sorted(names))
    classes = sorted({layer.merge_class.__name__ for layer in layers})
    return "every " + ", ".join(f"`{c}`" for c in classes)
