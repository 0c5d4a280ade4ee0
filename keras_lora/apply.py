"""`apply_lora`: put LoRA adapters on the target layers of a whole model.

Layers are found at any depth (functional graph nodes, nested models and the
sub-layers that subclassed layers such as keras-hub's transformer blocks
create as attributes) and addressed by their layer path, e.g.
`decoder_block_0/attention/query` in a keras-hub Gemma model.
"""

import collections.abc
import fnmatch
import functools
import re

import keras

from keras_lora import _keras_private
from keras_lora.clone import clone_with_layer_paths
from keras_lora.convert import LORA_CLASSES  # noqa: F401
from keras_lora.convert import convert_layer
from keras_lora.convert import freeze_base
from keras_lora.convert import lora_class_for
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRALayer
from keras_lora.layers import quantized
from keras_lora.layers.config import RESIDUAL_INITS
from keras_lora.layers.config import LoRAConfig
from keras_lora.layers.conv import LoRAConvMixin
from keras_lora.layers.depthwise import LoRADepthwiseConvMixin
from keras_lora.layers.depthwise import LoRASeparableConvMixin
from keras_lora.layers.einsum_dense import factor_equation
from keras_lora.saving import attach_plan
from keras_lora.walk import iter_layers
from keras_lora.walk import lora_layers
from keras_lora.walk import remember_models
from keras_lora.walk import reset_compiled_functions
from keras_lora.walk import stable_layer_paths
from keras_lora.walk import stable_path_of

#: What `targets`, `exclude` and `trainable_layers` accept: a str, compiled
#: regex, layer class or callable `(path, layer) -> bool`, a list of them,
#: or `None`.
Targets = (
    str
    | re.Pattern
    | type
    | collections.abc.Callable
    | collections.abc.Sequence
    | None
)

#: Names of attention query and value projections (the LoRA paper's
#: default targets) in Keras, keras-hub and Hugging Face style models, and
#: of fused query-key-value projections (which PEFT targets whole). A layer
#: is one if its name or its attribute name (the last part of its stable
#: path, for sub-layers Keras auto-names) is listed.
DEFAULT_ATTENTION_NAMES = (
    "query",
    "value",
    "q_proj",
    "v_proj",
    "q",
    "v",
    "query_proj",
    "value_proj",
    "query_dense",
    "value_dense",
    "query_projector",
    "value_projector",
    "q_dense_layer",
    "v_dense_layer",
    "qkv",
    "attention_qkv",
    "query_key_value",
)


#: `targets="all-linear"`: every Dense and EinsumDense layer except the
#: model's output head, as PEFT's `target_modules="all-linear"`.
ALL_LINEAR = "all-linear"

#: Layer types `"all-linear"` selects.
LINEAR_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)


#: `targets="all-conv"`: every convolution layer (Keras's 1-D, 2-D and 3-D,
#: transposed, depthwise and separable convolutions).
ALL_CONV = "all-conv"

#: Layer types `"all-conv"` selects.
CONV_TYPES = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
)


class _AllConv:
    """The `"all-conv"` target: a callable `(path, layer) -> bool`."""

    def __call__(self, path, layer):
        return isinstance(layer, CONV_TYPES)

    def __repr__(self):
        return repr(ALL_CONV)


class _AllLinear:
    """The `"all-linear"` target: a callable `(path, layer) -> bool`."""

    def __init__(self, heads):
        self.heads = heads

    def __call__(self, path, layer):
        return isinstance(layer, LINEAR_TYPES) and id(layer) not in self.heads

    def __repr__(self):
        return repr(ALL_LINEAR)


def output_heads(model):
    """The Dense / EinsumDense layers that compute `model`'s outputs.

    From each output of the functional graph (a keras-hub task, a
    functional or sequential model, nested ones followed inwards), back
    through layers without weights (activations, dropout, rescaling,
    reshapes, `keras.ops` calls) to the first layer with weights; it is a
    head if it is a Dense or EinsumDense. A layer with sub-layers there (a
    subclassed head block such as keras-hub's `MaskedLMHead`) is not one:
    its own Dense layers are adapted, as PEFT adapts a BERT masked-LM
    head's transform. A keras-hub causal LM whose logits come from the
    token embedding's reverse projection has no linear head.

    Returns:
        A list of layers (possibly empty).

    Raises:
        ValueError: `model` has no functional graph to follow (a subclassed
            model), so its head cannot be told apart.
    """
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(
            f"`targets='{ALL_LINEAR}'` needs a functional model (a keras-hub "
            "task or backbone, a Sequential or functional model) to find its "
            f"output head; {type(model).__name__} has no functional graph. "
            "List the target layers instead (and `exclude` the head)."
        )
    if any(
        c.__name__ == "Backbone" and c.__module__.startswith("keras_hub")
        for c in type(model).__mro__
    ):
        return []
    heads, seen = [], set()
    stack = list(keras.tree.flatten(outputs))
    while stack:
        layer, inputs = _keras_private.producer(stack.pop())
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, LINEAR_TYPES):
            heads.append(layer)
        elif isinstance(layer, keras.Model) and getattr(layer, "outputs", None):
            stack.extend(keras.tree.flatten(layer.outputs))
        elif not getattr(layer, "weights", None):
            # A layer without weights or a `keras.ops` call: see through.
            stack.extend(t for t in inputs if t is not None)
    return heads


def _expand_targets(model, layers, targets, argument="targets"):
    """`targets` (or `exclude`) with `"all-linear"` and `"all-conv"`
    replaced by their selectors; `layers` are the model's `iter_layers`
    pairs."""
    if isinstance(targets, str):
        entries = [targets]
    elif isinstance(targets, collections.abc.Iterable) and not isinstance(
        targets, (bytes, re.Pattern)
    ):
        entries = list(targets)
    else:
        return targets
    if any(isinstance(t, str) and t == ALL_CONV for t in entries):
        if not any(_AllConv()(p, lay) for p, lay in layers):
            raise ValueError(
                f"`{argument}='{ALL_CONV}'` selects nothing: the model has no "
                f"convolution layer. Received: {argument}={targets!r}"
            )
        entries = [
            _AllConv() if isinstance(t, str) and t == ALL_CONV else t
            for t in entries
        ]
    if not any(isinstance(t, str) and t == ALL_LINEAR for t in entries):
        return entries
    heads = output_heads(model)
    selector = _AllLinear({id(h) for h in heads})
    if not any(selector(p, lay) for p, lay in layers):
        raise ValueError(
            f"`{argument}='{ALL_LINEAR}'` selects nothing: every Dense and "
            f"EinsumDense layer of the model is an output head "
            f"({[h.name for h in heads]}) or there is none. Name the layers "
            f"instead. Received: {argument}={targets!r}"
        )
    return [
        selector if isinstance(t, str) and t == ALL_LINEAR else t
        for t in entries
    ]


def _is_default_attention(layer, stable_path):
    names = (layer.name, stable_path.rsplit("/", 1)[-1])
    return any(name in DEFAULT_ATTENTION_NAMES for name in names)


def _describe(pattern):
    if isinstance(pattern, type):
        return pattern.__name__
    if isinstance(pattern, re.Pattern):
        return f"re.compile({pattern.pattern!r})"
    return repr(pattern)


def _matches(pattern, path, layer):
    """Whether one target pattern selects the layer at `path`.

    A str matches the layer name, the full path, a trailing part of the path
    (`attention/query`), or the path as a glob (`*/attention/*`); a compiled
    regex must `fullmatch` the path; a class matches instances; a callable
    is called as `pattern(path, layer)`.
    """
    if isinstance(pattern, str):
        return (
            pattern == layer.name
            or pattern == path
            or path.endswith("/" + pattern)
            or fnmatch.fnmatchcase(path, pattern)
        )
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(path) is not None
    if isinstance(pattern, type):
        return isinstance(layer, pattern)
    return bool(pattern(path, layer))


def _as_pattern_list(value, argument):
    if value is None:
        return None
    if isinstance(value, (str, bytes, re.Pattern, type)) or callable(value):
        value = [value]
    try:
        patterns = list(value)
    except TypeError:
        raise TypeError(
            f"`{argument}` must be a str, regex, layer class, callable or a "
            f"list of them. Received: {argument}={value!r}"
        ) from None
    for pattern in patterns:
        ok = (
            isinstance(pattern, (str, re.Pattern))
            or (
                isinstance(pattern, type)
                and issubclass(pattern, keras.layers.Layer)
            )
            or (callable(pattern) and not isinstance(pattern, type))
        )
        if not ok or (isinstance(pattern, str) and not pattern):
            raise TypeError(
                f"`{argument}` entries must be non-empty str, compiled regex, "
                f"keras.layers.Layer subclass or callable(path, layer). "
                f"Received: {argument} entry {pattern!r}"
            )
    if not patterns:
        raise ValueError(f"`{argument}` must not be empty. Received: {value!r}")
    return patterns


def _per_layer(mapping, path, layer, default):
    """First value in `mapping` whose pattern matches (PEFT's rank_pattern)."""
    for pattern, value in (mapping or {}).items():
        if _matches(pattern, path, layer):
            return value
    return default


def select_targets(
    model: keras.layers.Layer,
    targets: Targets = None,
    exclude: Targets = None,
) -> dict[str, keras.layers.Layer]:
    """Returns `{path: layer}` of the layers `apply_lora` would adapt.

    Args:
        model: a built `keras.Model` (or layer).
        targets: `None`, or a str / compiled regex / layer class /
            callable(path, layer), or a list of them (see `apply_lora`).
        exclude: the same kinds; matching layers are removed.

    Raises:
        ValueError: a target pattern matches no layer (the message lists the
            layer paths that can be adapted), or nothing is left to adapt.
        TypeError: a pattern has an unsupported type, or a target matches a
            layer keras_lora cannot adapt.
    """
    return _select(
        model,
        list(iter_layers(model)),
        functools.cache(lambda: stable_path_of(model)),
        targets,
        exclude,
    )


def _unmatched(entries, layers, what, adaptable):
    """Raises if an entry of `entries` matches none of `layers`."""
    idle = [
        e for e in entries if not any(_matches(e, p, lay) for p, lay in layers)
    ]
    if idle:
        raise ValueError(
            f"These {what} match no layer of the model: "
            f"{', '.join(_describe(e) for e in idle)}. Layer paths that can "
            f"be adapted: {[p for p, _ in adaptable]}"
        )


def _select(model, layers, stable, targets, exclude):
    """`select_targets` over a walk already made: `layers`, the
    `iter_layers` pairs of `model`, and `stable()`, `stable_path_of` of the
    model (called only when needed)."""
    targets = _as_pattern_list(
        _expand_targets(model, layers, targets), "targets"
    )
    exclude = _as_pattern_list(
        _expand_targets(model, layers, exclude, "exclude"), "exclude"
    )
    already = [p for p, lay in layers if isinstance(lay, LoRALayer)]
    if already:
        raise ValueError(
            "`model` already has keras_lora layers; merge or unload it first. "
            f"Received: model with adapters at {already}"
        )
    adaptable = [(p, lay) for p, lay in layers if lora_class_for(lay)]
    if targets is None:
        stable = stable()
        selected = [
            (p, lay)
            for p, lay in adaptable
            if _is_default_attention(lay, stable.get(id(lay), ""))
        ]
        if not selected:
            selected = [
                (p, lay)
                for p, lay in adaptable
                if issubclass(
                    lora_class_for(lay),
                    (
                        LoRADense,
                        LoRAEinsumDense,
                        LoRAConvMixin,
                        LoRADepthwiseConvMixin,
                        LoRASeparableConvMixin,
                    ),
                )
            ]
    else:
        _unmatched(targets, layers, "`targets`", adaptable)
        selected = [
            (p, lay)
            for p, lay in layers
            if any(_matches(t, p, lay) for t in targets)
        ]
    if exclude is not None:
        _unmatched(exclude, layers, "`exclude` entries", adaptable)
        selected = [
            (p, lay)
            for p, lay in selected
            if not any(_matches(e, p, lay) for e in exclude)
        ]
    wrong = [
        f"{p} ({type(lay).__name__})"
        for p, lay in selected
        if lora_class_for(lay) is None
    ]
    if wrong:
        raise TypeError(
            "`targets` selects layers keras_lora cannot adapt (supported: "
            "Dense, EinsumDense, Conv1D, Conv2D, Conv3D, their Transpose "
            "forms, DepthwiseConv1D, DepthwiseConv2D, SeparableConv1D, "
            "SeparableConv2D, Embedding, ReversibleEmbedding): "
            f"{wrong}; `exclude` them."
        )
    # Sub-layers the model never builds (never calls) are left alone;
    # `lora_report` lists them.
    unbuilt = [p for p, lay in selected if not lay.built]
    if targets is not None and unbuilt:
        # A target entry that names only unbuilt layers would adapt nothing.
        built = [(p, lay) for p, lay in selected if lay.built]
        idle = [
            t
            for t in targets
            if any(_matches(t, p, lay) for p, lay in selected)
            and not any(_matches(t, p, lay) for p, lay in built)
        ]
        if idle:
            raise ValueError(
                "These `targets` select only layers the model never builds "
                f"(never calls): {', '.join(_describe(t) for t in idle)}. "
                f"Unbuilt layers: {unbuilt}. Build or call the model on an "
                "input before apply_lora, or drop these entries."
            )
    selected = [(p, lay) for p, lay in selected if lay.built]
    if not selected:
        if unbuilt:
            raise ValueError(
                "Every layer `targets` selects is unbuilt (the model never "
                f"calls them): {unbuilt}. Build or call the model on an "
                "input before apply_lora."
            )
        raise ValueError(
            "No layer left to adapt (after `exclude`). Layer paths that can "
            f"be adapted: {[p for p, _ in adaptable]}"
        )
    for path, layer in selected:
        quantized.check_supported(layer, f"Layer {path!r}")
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer {path!r} has Keras's built-in LoRA enabled "
                "(`enable_lora`); keras_lora cannot adapt it."
            )
        if isinstance(layer, keras.layers.EinsumDense):
            factor_equation(layer.equation)
    return dict(selected)


def own_trained_variables(model, walked, kept_layers):
    """Gives the clone its own copies of what it trains besides adapters.

    The clone shares `model`'s variables; frozen ones stay shared (no copy),
    but the weights (and statistics) of `trainable_layers` and the biases
    of `train_bias=True` layers change in `fit`, and `model` must keep its
    outputs. These are copied into new variables of the clone's layers.

    Args:
        model: the model given to `apply_lora`.
        walked: `[(path, layer)]` of the clone.
        kept_layers: ids of the clone's `trainable_layers` matches.
    """
    shared = {id(v) for v in model.weights}
    trained = set()
    for _, layer in walked:
        if id(layer) in kept_layers:
            trained.update(id(v) for v in layer.weights)
        elif isinstance(layer, LoRALayer) and layer.train_bias:
            bias = layer.base_weights().get("bias")
            if bias is not None:
                trained.add(id(bias))
    trained &= shared
    if not trained:
        return
    for path, layer in walked:
        own = [
            v for v in _keras_private.own_variables(layer) if id(v) in trained
        ]
        if not own:
            continue
        parent = path.rpartition("/")[0] or None
        mapping = {}
        with keras.name_scope(layer.name, caller=layer, override_parent=parent):
            for variable in own:
                mapping[id(variable)] = keras.Variable(
                    initializer=keras.ops.copy(variable.value),
                    dtype=variable.dtype,
                    trainable=variable.trainable,
                    aggregation=variable.aggregation,
                    synchronization=variable.synchronization,
                    name=variable.name,
                )
        _keras_private.replace_variables(layer, mapping)


def _check_residual_ranks(plan, selected, init):
    """PiSSA / OLoRA factor each adapted weight to its rank: refuses, before
    anything is converted, a layer whose rank exceeds `min(d_in, d_out)`."""
    small = {}
    for path, (lora_class, layer_config) in plan.items():
        dims = lora_class.adapted_dims(selected[path])
        if layer_config.rank > min(min(d) for d in dims):
            small[path] = (layer_config.rank, dims)
    if small:
        listed = "; ".join(
            f"'{p}': rank={r}, (d_in, d_out) {d}" for p, (r, d) in small.items()
        )
        raise ValueError(
            f"`init={init!r}` needs rank <= min(d_in, d_out) for every "
            f"adapted weight; these layers are smaller: {listed}. Lower "
            "their rank (`rank_pattern`) or `exclude` them. Nothing was "
            "changed."
        )


def apply_lora(
    model: keras.Model,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = None,
    exclude: Targets = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    train_bias: bool = False,
    trainable_layers: Targets = None,
    inplace: bool = False,
    init: str = "default",
    use_dora: bool = False,
) -> keras.Model:
    """Adds LoRA adapters to the target layers of a model.

    Returns a model of the same class (a keras-hub `GemmaCausalLM` keeps
    `generate()` and its preprocessor; a `Sequential` stays `Sequential`)
    whose target layers, at any depth, are keras_lora layers. The returned
    model shares every base variable with `model` (nothing is copied: memory
    grows by the adapters only), and its outputs equal `model`'s until the
    adapters train (B starts at zero). All base variables are frozen; the
    trainable weights are the adapters plus the layers in
    `trainable_layers` (e.g. a new classification head). As in PEFT, the
    frozen flag is on the shared variables, so `model`'s own trainable
    weights shrink to the same set.

    Args:
        model: a built `keras.Model` (functional, sequential, keras-hub task
            or backbone, or a subclassed model with `get_config`).
        rank: int, the LoRA rank r. Defaults to `8`.
        alpha: float or `None` (= rank). Scaling is `alpha / rank`
            (Hu et al. 2021, arXiv:2106.09685, eq. 4).
        targets: which layers to adapt. `None` (default): the attention query
            and value projections (by name or attribute name: `query`,
            `value`, `q_proj`, `v_proj`, ... and fused `qkv` layers; see
            `DEFAULT_ATTENTION_NAMES`), the LoRA paper's choice; if the
            model has none, every Dense, EinsumDense and convolution
            (Conv1D/2D/3D, their Transpose forms, depthwise and separable).
            `"all-linear"`: every Dense and EinsumDense except the model's
            output head (see `keras_lora.apply.output_heads`), as PEFT's
            `target_modules="all-linear"`; it can be combined with other
            entries and with `exclude`. `"all-conv"`: every convolution
            layer (Conv1D/2D/3D, their Transpose forms, depthwise and
            separable).
            Otherwise a str, compiled regex, layer class or callable
            `(path, layer) -> bool`, or a list of them. A str matches a
            layer name, a path, a trailing part of a path
            (`"attention/query"`), or a glob on the path; a regex must
            fullmatch the path. Every entry must match some layer.
        exclude: the same kinds as `targets` (`"all-linear"` and
            `"all-conv"` too); matches
            are not adapted. Every entry must match some layer.
        dropout: float in [0, 1), LoRA dropout. Defaults to `0.0`.
        use_rslora: bool, scale by `alpha / sqrt(rank)`. Defaults to `False`.
        rank_pattern: optional dict `{pattern: rank}` overriding `rank` per
            layer (first matching pattern wins), as PEFT's `rank_pattern`.
        alpha_pattern: optional dict `{pattern: alpha}`, likewise.
        train_bias: bool, keep the biases of adapted layers trainable.
        trainable_layers: patterns (as `targets`) of layers whose weights
            stay trainable, e.g. a new head: `trainable_layers=["logits"]`.
        inplace: bool. `False` (default) returns a new model and leaves
            `model`'s layers as they are; `True` converts `model` itself
            (PEFT's behaviour) and returns it.
        init: str, how every adapter starts (as the layers' `init`):
            `"default"`, `"gaussian"` (PEFT's), `"pissa"` (arXiv:2404.02948)
            or `"olora"` (arXiv:2406.01775). With `"pissa"` / `"olora"`
            each adapted layer computes with the residual
            `W - s * A0 @ B0` in a new variable (memory: one more copy of
            every adapted base weight); `model`'s weights keep their
            values, and adapter files hold the plain LoRA update against
            them (rank 2r, see `keras_lora.layers.inits`).
        use_dora: bool, DoRA (Liu et al. 2024, arXiv:2402.09353) on every
            adapted layer: a trainable magnitude per output unit rescales
            `W + s * A @ B` to `m * (W + s * A @ B) / ||W + s * A @ B||`
            (see `keras_lora.layers.dora`). Defaults to `False`.

    Returns:
        The adapted model (`model` itself when `inplace=True`).

    Raises:
        ValueError: invalid `rank`, `alpha` or `dropout` (also in the
            patterns), a target that matches nothing (the message lists the
            layer paths), an unbuilt or quantized target, or a model that
            already has keras_lora layers.
        TypeError: a target matches a layer type keras_lora cannot adapt, or
            a pattern argument has the wrong type.

    All checks run before anything is changed.

    Examples:
        >>> import keras, keras_lora
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> lora_model = keras_lora.apply_lora(model, rank=2)
        >>> [w.name for w in lora_model.trainable_weights]
        ['lora_a', 'lora_b']
    """
    config = LoRAConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        train_bias=train_bias,
        init=init,
        use_dora=use_dora,
    )
    if not isinstance(inplace, bool):
        raise TypeError(
            f"`inplace` must be a bool. Received: inplace={inplace!r}"
        )
    for argument, mapping in (
        ("rank_pattern", rank_pattern),
        ("alpha_pattern", alpha_pattern),
    ):
        if mapping is not None and not isinstance(mapping, dict):
            raise TypeError(
                f"`{argument}` must be a dict {{pattern: value}}. "
                f"Received: {argument}={mapping!r}"
            )
    keep = _as_pattern_list(trainable_layers, "trainable_layers")
    # One walk of `model` by name path and one by stable path serve target
    # selection, `trainable_layers` and carrying the plan to the clone.
    walked = list(iter_layers(model))
    # The stable paths serve here and, reused, the clone (one walk each).
    original_paths = functools.cache(lambda: stable_layer_paths(model))
    stable = functools.cache(
        lambda: {id(layer): path for path, layer in original_paths().items()}
    )
    selected = _select(model, walked, stable, targets, exclude)
    for argument, mapping in (
        ("rank_pattern", rank_pattern),
        ("alpha_pattern", alpha_pattern),
    ):
        idle = [
            key
            for key in mapping or {}
            if not any(_matches(key, p, lay) for p, lay in selected.items())
        ]
        if idle:
            raise ValueError(
                f"These `{argument}` keys select no adapted layer: "
                f"{', '.join(_describe(k) for k in idle)}. Adapted layer "
                f"paths: {list(selected)}"
            )
    plan = {}
    for path, layer in selected.items():
        layer_rank = _per_layer(rank_pattern, path, layer, rank)
        layer_alpha = _per_layer(alpha_pattern, path, layer, alpha)
        layer_config = config
        if (layer_rank, layer_alpha) != (rank, alpha):
            layer_config = config.replace(rank=layer_rank, alpha=layer_alpha)
        plan[path] = (lora_class_for(layer), layer_config)
    if config.use_dora or config.init in RESIDUAL_INITS:
        on_quantized = sorted(
            p for p in plan if quantized.quantization_mode(selected[p])
        )
        if on_quantized:
            option = "use_dora=True" if config.use_dora else f"init={init!r}"
            raise ValueError(
                f"{option} needs float base weights; these target layers are "
                f"quantized: {on_quantized}. Apply LoRA with {option} before "
                "quantizing, or use plain LoRA (QLoRA) on the quantized "
                "model. Nothing was changed."
            )
    if config.init in RESIDUAL_INITS:
        _check_residual_ranks(plan, selected, config.init)
    if keep is not None:
        layers = walked
        unmatched = [
            k for k in keep if not any(_matches(k, p, lay) for p, lay in layers)
        ]
        if unmatched:
            raise ValueError(
                "These `trainable_layers` match no layer: "
                f"{', '.join(_describe(k) for k in unmatched)}. Layer paths: "
                f"{[p for p, _ in layers]}"
            )

    # The plan is carried over to the clone by stable path (keras_lora.walk):
    # the clone's layer names may be numbered differently.
    if inplace:
        target = model
        layers = {path: selected[path] for path in plan}
    else:
        stable = stable()
        unreachable = [p for p in plan if id(selected[p]) not in stable]
        if unreachable:
            raise ValueError(
                "Cannot clone the model: these target layers are not where "
                f"Keras's saving library finds the model's layers: "
                f"{unreachable} (e.g. an attribute that was reassigned). "
                "Use `apply_lora(..., inplace=True)`."
            )
        plan = {stable[id(selected[p])]: args for p, args in plan.items()}
        target, layers = clone_with_layer_paths(
            model, originals=original_paths()
        )
    for path, (lora_class, layer_config) in plan.items():
        convert_layer(layers[path], lora_class, layer_config)

    # Freeze and refresh over one walk of the adapted model.
    walked = list(iter_layers(target))
    kept_layers = set()
    if keep is not None:
        kept_layers = {
            id(layer)
            for path, layer in walked
            if any(_matches(k, path, layer) for k in keep)
        }
    if not inplace:
        own_trained_variables(model, walked, kept_layers)
    freeze_base(target, kept_layers, layers=[lay for _, lay in walked])
    _keras_private.pin_quantized_policies([lay for _, lay in walked])
    for _, layer in walked:
        if isinstance(layer, LoRALayer):
            layer.base_shared = not inplace
    attach_plan(target)
    for _, layer in walked:
        _keras_private.refresh_torch_params(layer)
    _keras_private.refresh_torch_params(target)
    remember_models(target, lora_layers(target))
    if inplace:
        # Functions traced before the conversion compute without adapters.
        reset_compiled_functions(target)
        if getattr(target, "compiled", False):
            target.compile_from_config(target.get_compile_config())
    return target
