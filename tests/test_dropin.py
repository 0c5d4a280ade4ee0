"""Drop-in replacement: at B = 0 every keras_lora layer behaves as the Keras
layer it subclasses.

Each test builds the plain Keras layer and the LoRA layer with the same
arguments, gives them the same base weights, and checks one behaviour Keras
gives its layer: outputs and shapes, masks, sparse and ragged inputs, the
`weights=` argument, `get_weights`/`set_weights`, constraints, regularizers,
configs and serialization, dtype policies, variable loading and `.keras`
files, trainable flags, and use in `Sequential` / functional models. Where
keras_lora differs on purpose, the test states the difference (listed in
docs/layers.md, "Where the layers differ from Keras's").
"""

import json
import typing

import keras
import keras_hub
import numpy as np
import pytest
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl
from keras_lora.layers.base import LORA_CONFIG_KEYS

BACKEND = keras.backend.backend()
# The backends on which Keras's SUPPORTS_SPARSE_TENSORS and
# SUPPORTS_RAGGED_TENSORS are true.
SPARSE = BACKEND in ("tensorflow", "jax")
RAGGED = BACKEND == "tensorflow"
NO_SPARSE = "Keras has no sparse tensors on this backend"
NO_RAGGED = "Keras has ragged tensors on TensorFlow only"

RANK = 2


def _floats(shape):
    return lambda rng: rng.normal(size=shape).astype("float32")


def _ids(shape, vocab=12):
    # Ids from 0, so that mask_zero has something to mask.
    return lambda rng: rng.integers(0, vocab, size=shape).astype("int32")


class Kind(typing.NamedTuple):
    plain: typing.Callable  # the Keras layer, from keyword arguments
    lora: typing.Callable  # the LoRA layer, from the same arguments
    inputs: typing.Callable  # an input, from `rng`
    weights: tuple  # prefixes of the `*_constraint` / `*_regularizer` args
    init: dict  # constant initializers (see `FAST_A_INIT`)


KERNEL_INIT = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
TABLE_INIT = {"embeddings_initializer": "zeros"}
DEPTHWISE_INIT = {"depthwise_initializer": "zeros", "bias_initializer": "zeros"}
# Layers are made with constant initializers and then given random base
# weights from NumPy (`pair`): JAX compiles a random initializer anew for
# each shape, seconds per layer on 2 cores. The default (random) A is used
# in `test_outputs_and_shapes_equal_the_plain_layers`.
FAST_A_INIT = {"lora_a_initializer": "ones"}

KINDS = {
    "dense": Kind(
        lambda **kw: keras.layers.Dense(5, **kw),
        lambda **kw: kl.LoRADense(5, rank=RANK, **kw),
        _floats((3, 4, 6)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "einsum_dense": Kind(
        lambda **kw: keras.layers.EinsumDense(
            "btd,dnh->btnh", (4, 2, 3), bias_axes="nh", **kw
        ),
        lambda **kw: kl.LoRAEinsumDense(
            "btd,dnh->btnh", (4, 2, 3), bias_axes="nh", rank=RANK, **kw
        ),
        _floats((2, 4, 6)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "conv2d": Kind(
        lambda **kw: keras.layers.Conv2D(4, 3, **kw),
        lambda **kw: kl.LoRAConv2D(4, 3, rank=RANK, **kw),
        _floats((2, 6, 6, 3)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "conv1d": Kind(
        lambda **kw: keras.layers.Conv1D(4, 3, padding="causal", **kw),
        lambda **kw: kl.LoRAConv1D(4, 3, padding="causal", rank=RANK, **kw),
        _floats((2, 6, 3)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "conv3d": Kind(
        lambda **kw: keras.layers.Conv3D(4, 2, **kw),
        lambda **kw: kl.LoRAConv3D(4, 2, rank=RANK, **kw),
        _floats((2, 4, 4, 4, 3)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "conv2d_transpose": Kind(
        lambda **kw: keras.layers.Conv2DTranspose(4, 3, strides=2, **kw),
        lambda **kw: kl.LoRAConv2DTranspose(4, 3, strides=2, rank=RANK, **kw),
        _floats((2, 4, 4, 3)),
        ("kernel", "bias"),
        KERNEL_INIT,
    ),
    "depthwise_conv2d": Kind(
        lambda **kw: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, **kw),
        lambda **kw: kl.LoRADepthwiseConv2D(
            3, depth_multiplier=2, rank=RANK, **kw
        ),
        _floats((2, 6, 6, 3)),
        ("depthwise", "bias"),
        DEPTHWISE_INIT,
    ),
    "separable_conv1d": Kind(
        lambda **kw: keras.layers.SeparableConv1D(4, 3, **kw),
        lambda **kw: kl.LoRASeparableConv1D(4, 3, rank=RANK, **kw),
        _floats((2, 6, 3)),
        ("depthwise", "pointwise", "bias"),
        {**DEPTHWISE_INIT, "pointwise_initializer": "zeros"},
    ),
    "embedding": Kind(
        lambda **kw: keras.layers.Embedding(12, 5, **kw),
        lambda **kw: kl.LoRAEmbedding(12, 5, rank=RANK, **kw),
        _ids((2, 4)),
        ("embeddings",),
        TABLE_INIT,
    ),
    "reversible_embedding": Kind(
        lambda **kw: keras_hub.layers.ReversibleEmbedding(
            12, 5, tie_weights=False, **kw
        ),
        lambda **kw: kl.LoRAReversibleEmbedding(
            12, 5, tie_weights=False, rank=RANK, **kw
        ),
        _ids((2, 4)),
        ("embeddings",),
        TABLE_INIT,
    ),
}
NAMES = list(KINDS)
EMBEDDINGS = ["embedding", "reversible_embedding"]


def plain_layer(name, **kwargs):
    """The Keras layer of kind `name` (constant initializers)."""
    kind = KINDS[name]
    return kind.plain(**{**kind.init, **kwargs})


def lora_layer(name, **kwargs):
    """The LoRA layer of kind `name` (constant initializers, B = 0)."""
    kind = KINDS[name]
    return kind.lora(**{**kind.init, **FAST_A_INIT, **kwargs})


def randomize(layer, rng):
    """Random values (NumPy, float32) for every weight of `layer`."""
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))


def copy_base(plain, lora):
    """Gives `lora` the base weights of `plain` (matched by name)."""
    base = lora.base_weights()
    assert sorted(base) == sorted(w.name for w in plain.weights)
    for weight in plain.weights:
        base[weight.name].assign(to_numpy(weight))


def pair(name, rng, default_adapters=False, **kwargs):
    """The plain and the LoRA layer of kind `name`, built with the same
    arguments and the same random base weights, and an input for them.
    `default_adapters=True`: the LoRA layer's own adapter initializers
    (A random, B zero) instead of the constant A."""
    kind = KINDS[name]
    x = kind.inputs(rng)
    plain = plain_layer(name, **kwargs)
    if default_adapters:
        lora = kind.lora(**{**kind.init, **kwargs})
    else:
        lora = lora_layer(name, **kwargs)
    for layer in (plain, lora):
        layer.build(x.shape)
    randomize(plain, rng)
    copy_base(plain, lora)
    return plain, lora, x


def set_adapters(layer, rng):
    """Non-zero adapters, so that a check cannot pass on B = 0 alone."""
    for weight in layer.adapter_weights().values():
        weight.assign(rng.normal(size=weight.shape).astype("float32"))


def spec_of(x):
    return keras.KerasTensor(x.shape, dtype=str(x.dtype))


def sparse_tensor(dense):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.sparse.from_dense(dense)
    import jax.experimental.sparse as jax_sparse

    return jax_sparse.BCOO.fromdense(dense)


# -- Outputs and shapes --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_shapes_equal_the_plain_layers(rng, name):
    """Keras computes the output, `compute_output_shape`,
    `compute_output_spec` and the symbolic output shape of a layer; at B = 0
    the LoRA layer gives the same, bit for bit (here with its default
    adapter initializers: A random, B zero)."""
    plain, lora, x = pair(name, rng, default_adapters=True)
    assert np.any(to_numpy(lora.lora_a) != 0)
    assert_exact(to_numpy(lora.lora_b), np.zeros(lora.lora_b.shape))
    assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
    assert lora.compute_output_shape(x.shape) == plain.compute_output_shape(
        x.shape
    )
    lora_spec = lora.compute_output_spec(spec_of(x))
    plain_spec = plain.compute_output_spec(spec_of(x))
    assert lora_spec.shape == plain_spec.shape
    assert lora_spec.dtype == plain_spec.dtype
    symbolic = keras.Input(x.shape[1:], dtype=str(x.dtype))
    assert lora(symbolic).shape == plain(symbolic).shape
    assert tuple(lora(x).shape) == tuple(plain_spec.shape)


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 6), (2, 2, 3, 6)])
def test_dense_on_inputs_of_any_rank(rng, shape):
    """Keras's Dense contracts the last axis of an N-D input (N >= 2); so
    does LoRADense, with the same output, with an activation and with no
    bias."""
    for activation, use_bias in ((None, True), ("relu", False)):
        kwargs = {"activation": activation, "use_bias": use_bias}
        plain = keras.layers.Dense(5, **KERNEL_INIT, **kwargs)
        lora = kl.LoRADense(5, rank=RANK, **KERNEL_INIT, **kwargs)
        x = rng.normal(size=shape).astype("float32")
        plain.build(shape)
        lora.build(shape)
        randomize(plain, rng)
        copy_base(plain, lora)
        assert (lora.bias is None) == (not use_bias)
        assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
        assert lora.compute_output_shape(shape) == shape[:-1] + (5,)


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, input_shape",
    [
        ("ab,bc->ac", 7, None, (2, 6)),
        ("ab,bc->ac", (7,), "c", (2, 6)),
        ("abc,cde->abde", (3, 2, 4), "de", (2, 3, 5)),
        ("abc,cde->abde", (3, 2, 4), "be", (2, 3, 5)),
        ("abcd,cde->abe", (3, 4), "e", (2, 3, 2, 5)),
        ("ibd,nd->ibn", (3, 4), None, (2, 3, 5)),
        ("...b,bc->...c", (4,), "c", (2, 3, 5)),
        ("...c,cde->...de", (2, 3), "d", (2, 1, 5)),
        ("bc...,cde->bde...", (2, 3), "e", (2, 5, 3, 2)),
        ("abc,cd->abd", (None, 4), "d", (2, 3, 5)),
    ],
)
def test_einsum_dense_equations(
    rng, equation, output_shape, bias_axes, input_shape
):
    """Keras's EinsumDense takes any equation whose kernel splits into
    contracted and output axes, with bias_axes, ellipses and unknown output
    axes; LoRAEinsumDense gives the same output shape (before and after
    build) and output."""
    kwargs = {"bias_axes": bias_axes, **KERNEL_INIT}
    plain = keras.layers.EinsumDense(equation, output_shape, **kwargs)
    lora = kl.LoRAEinsumDense(equation, output_shape, rank=RANK, **kwargs)
    unknown_batch = (None,) + input_shape[1:]
    assert lora.compute_output_shape(
        unknown_batch
    ) == plain.compute_output_shape(unknown_batch)
    plain.build(input_shape)
    lora.build(input_shape)
    randomize(plain, rng)
    copy_base(plain, lora)
    x = rng.normal(size=input_shape).astype("float32")
    assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
    assert lora.compute_output_shape(input_shape) == plain.compute_output_shape(
        input_shape
    )


CONV_CONFIGS = [
    {"kernel_size": 3},
    {"kernel_size": 2, "padding": "same", "dilation_rate": 2, "groups": 2},
    {"kernel_size": (3, 2), "strides": (2, 1), "groups": 3},
    {"kernel_size": 3, "strides": 2, "padding": "same"},
    {"kernel_size": (1, 3), "dilation_rate": (1, 2), "activation": "relu"},
    {"kernel_size": 3, "padding": "same", "data_format": "channels_first"},
    {
        "kernel_size": (3, 3),
        "strides": (1, 2),
        "data_format": "channels_first",
        "groups": 2,
    },
    {"kernel_size": 2, "use_bias": False, "data_format": "channels_first"},
]


@pytest.mark.parametrize(
    "config", CONV_CONFIGS, ids=[str(c) for c in CONV_CONFIGS]
)
def test_conv2d_configurations(rng, config):
    """Keras's Conv2D takes strides, dilation, groups, `same`/`valid`
    padding and both data formats; LoRAConv2D gives the same output shape
    and output, or, where the plain Conv2D cannot run on this machine (on
    some CPUs TensorFlow refuses NCHW with groups=1), the same error."""
    channels_first = config.get("data_format") == "channels_first"
    shape = (2, 6, 7, 9) if channels_first else (2, 7, 9, 6)
    plain = keras.layers.Conv2D(6, **KERNEL_INIT, **config)
    lora = kl.LoRAConv2D(6, rank=RANK, **KERNEL_INIT, **FAST_A_INIT, **config)
    plain.build(shape)
    lora.build(shape)
    randomize(plain, rng)
    copy_base(plain, lora)
    assert lora.compute_output_shape(shape) == plain.compute_output_shape(shape)
    x = rng.normal(size=shape).astype("float32")
    try:
        expected = to_numpy(plain(x))
    except Exception as error:  # whatever the plain layer raises
        with pytest.raises(type(error)):
            lora(x)
        return
    assert_exact(to_numpy(lora(x)), expected)
    assert expected.shape == plain.compute_output_shape(shape)


@pytest.mark.parametrize("shape", [(5,), (2, 4), (2, 3, 4)])
@pytest.mark.parametrize("name", EMBEDDINGS)
def test_embedding_lookups_of_any_rank(rng, name, shape):
    """Keras's Embedding looks up ids of any rank (int32, int64, or floats
    it casts); the LoRA embeddings give the same rows."""
    plain, lora, _ = pair(name, rng)
    ids = rng.integers(0, 12, size=shape)
    for dtype in ("int32", "int64", "float32"):
        x = ids.astype(dtype)
        assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
    assert lora.compute_output_shape(shape) == plain.compute_output_shape(shape)
    assert tuple(lora.compute_output_shape(shape)) == shape + (5,)


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("logit_soft_cap", [None, 3.0])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5)])
def test_reversible_embedding_logits(rng, tie_weights, logit_soft_cap, shape):
    """keras-hub's ReversibleEmbedding with `reverse=True` maps hidden states
    to logits (tied or untied, optionally soft-capped);
    LoRAReversibleEmbedding gives the same logits, shapes and dtype."""
    kwargs = {
        "tie_weights": tie_weights,
        "logit_soft_cap": logit_soft_cap,
        **TABLE_INIT,
    }
    plain = keras_hub.layers.ReversibleEmbedding(12, 5, **kwargs)
    lora = kl.LoRAReversibleEmbedding(12, 5, rank=RANK, **kwargs)
    plain.build()
    lora.build()
    randomize(plain, rng)
    copy_base(plain, lora)
    x = rng.normal(size=shape).astype("float32")
    logits = plain(x, reverse=True)
    assert_exact(to_numpy(lora(x, reverse=True)), to_numpy(logits))
    assert keras.backend.standardize_dtype(
        lora(x, reverse=True).dtype
    ) == keras.backend.standardize_dtype(logits.dtype)
    assert lora.compute_output_shape(
        shape, reverse=True
    ) == plain.compute_output_shape(shape, reverse=True)
    symbolic = keras.Input(shape[1:])
    assert lora(symbolic, reverse=True).shape == (
        plain(symbolic, reverse=True).shape
    )


# -- Masks ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_supports_masking_is_the_plain_layers(name):
    """Keras sets `supports_masking` per layer (Dense: True, EinsumDense and
    Conv2D: False, Embedding: `mask_zero`); the LoRA layers keep it."""
    plain_factory, lora_factory = KINDS[name].plain, KINDS[name].lora
    assert lora_factory().supports_masking == plain_factory().supports_masking
    if name in EMBEDDINGS:
        for mask_zero in (True, False):
            assert (
                lora_factory(mask_zero=mask_zero).supports_masking
                == plain_factory(mask_zero=mask_zero).supports_masking
            )


@pytest.mark.parametrize("name", EMBEDDINGS)
@pytest.mark.parametrize("mask_zero", [True, False])
def test_embedding_mask_zero(rng, name, mask_zero):
    """Keras's Embedding with `mask_zero=True` masks id 0: `compute_mask`
    and the output's `_keras_mask`, eager and symbolic, are the plain
    layer's (keras-hub's ReversibleEmbedding sets the mask in `call`, and
    its `compute_mask` returns None); without `mask_zero`, no mask."""
    plain, lora, _ = pair(name, rng, mask_zero=mask_zero)
    ids = np.array([[3, 1, 0, 0], [0, 2, 5, 0]], "int32")
    plain_mask = plain.compute_mask(ids)
    lora_mask = lora.compute_mask(ids)
    assert (lora_mask is None) == (plain_mask is None)
    if plain_mask is not None:
        assert_exact(to_numpy(lora_mask), to_numpy(plain_mask))
    plain_out, lora_out = plain(ids), lora(ids)
    plain_kept = getattr(plain_out, "_keras_mask", None)
    lora_kept = getattr(lora_out, "_keras_mask", None)
    assert (lora_kept is None) == (plain_kept is None) == (not mask_zero)
    if mask_zero:
        assert_exact(to_numpy(lora_kept), ids != 0)
        assert_exact(to_numpy(lora_kept), to_numpy(plain_kept))
    symbolic = keras.Input((4,), dtype="int32")
    plain_sym = getattr(plain(symbolic), "_keras_mask", None)
    lora_sym = getattr(lora(symbolic), "_keras_mask", None)
    assert (lora_sym is None) == (plain_sym is None)


def test_embedding_mask_reaches_the_next_layer(rng):
    """In a Keras model the Embedding's mask reaches the layers after it
    (a masked GlobalAveragePooling1D); with LoRAEmbedding the model's
    output is the plain model's."""
    ids = np.array([[3, 1, 0, 0], [4, 2, 5, 0]], "int32")
    outputs = []
    plain, lora, _ = pair("embedding", rng, mask_zero=True)
    for layer in (plain, lora):
        inputs = keras.Input((4,), dtype="int32")
        pooled = keras.layers.GlobalAveragePooling1D()(layer(inputs))
        outputs.append(to_numpy(keras.Model(inputs, pooled)(ids)))
    table = to_numpy(plain.embeddings)
    assert_exact(outputs[1], outputs[0])
    # The mask was used: padding rows are left out of the mean.
    assert_close(outputs[0][0], table[[3, 1]].mean(axis=0))
    assert_close(outputs[0][1], table[[4, 2, 5]].mean(axis=0))


def test_dense_passes_the_mask_through(rng):
    """Keras's Dense supports masking: the mask of its input is the mask of
    its output (`compute_mask` returns it and a Masking layer's mask
    reaches the output); LoRADense does the same."""
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    x[0, 3] = 0.0
    x[1, 1:] = 0.0
    mask = np.array([[True, False, True, True]] * 2)
    plain, lora, _ = pair("dense", rng)
    assert_exact(
        to_numpy(lora.compute_mask(x, keras.ops.convert_to_tensor(mask))),
        to_numpy(plain.compute_mask(x, keras.ops.convert_to_tensor(mask))),
    )
    masks = []
    for layer in (plain, lora):
        out = layer(keras.layers.Masking()(x))
        masks.append(to_numpy(out._keras_mask))
    assert_exact(masks[1], masks[0])
    assert_exact(masks[0], np.any(x != 0, axis=-1))


# -- Sparse and ragged inputs --------------------------------------------------


@pytest.mark.skipif(not SPARSE, reason=NO_SPARSE)
def test_dense_sparse_input(rng):
    """Keras's Dense takes a sparse input (tf.SparseTensor, JAX BCOO) and
    computes what it computes on the dense one; LoRADense gives the same
    output, in a model with a sparse `keras.Input` too, and trains there
    (TensorFlow: not jit-compiled, as Keras does with sparse inputs)."""
    plain, lora, _ = pair("dense", rng)
    dense = rng.normal(size=(10, 6)).astype("float32")
    dense *= np.abs(dense) > 1.0
    x = sparse_tensor(dense)
    assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
    inputs = keras.Input((6,), sparse=True)
    model = keras.Model(inputs, lora(inputs))
    plain_model = keras.Model(inputs, plain(inputs))
    assert_exact(to_numpy(model(x)), to_numpy(plain_model(x)))
    model.compile(
        optimizer="sgd",
        loss="mse",
        jit_compile=False if BACKEND == "tensorflow" else "auto",
    )
    kernel = to_numpy(lora.kernel)
    model.train_on_batch(x, np.ones((10, 5), "float32"))
    assert_exact(to_numpy(lora.kernel), kernel)
    assert np.any(to_numpy(lora.lora_b) != 0)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.GradientTape only")
def test_dense_sparse_input_gives_sparse_gradients(rng):
    """On TensorFlow, Keras's Dense on a sparse input gives its kernel an
    IndexedSlices gradient; LoRADense's trainable weight on that input,
    lora_a, gets one too (lora_b follows x @ A, which is dense)."""
    import tensorflow as tf

    plain, lora, _ = pair("dense", rng)
    dense = rng.normal(size=(10, 6)).astype("float32")
    x = sparse_tensor(dense * (np.abs(dense) > 1.0))
    with tf.GradientTape() as tape:
        y = plain(x)
    assert isinstance(tape.gradient(y, plain.kernel), tf.IndexedSlices)
    with tf.GradientTape() as tape:
        y = lora(x)
    grads = tape.gradient(y, lora.trainable_weights)
    assert [w.name for w in lora.trainable_weights] == ["lora_a", "lora_b"]
    assert isinstance(grads[0], tf.IndexedSlices)


@pytest.mark.skipif(not SPARSE, reason=NO_SPARSE)
def test_dense_sparse_input_with_branch_dropout(rng):
    """Keras's Dense runs on a sparse input in training too; LoRADense with
    branch dropout does as well (the dropout acts in training only, so the
    inference output is still the plain layer's)."""
    plain, _, x = pair("dense", rng)
    lora = lora_layer("dense", dropout=0.5)
    lora.build(x.shape)
    copy_base(plain, lora)
    dense = rng.normal(size=(10, 6)).astype("float32")
    x = sparse_tensor(dense * (np.abs(dense) > 1.0))
    assert_exact(to_numpy(lora(x)), to_numpy(plain(x)))
    assert tuple(lora(x, training=True).shape) == (10, 5)


@pytest.mark.skipif(not SPARSE, reason=NO_SPARSE)
@pytest.mark.parametrize("name", EMBEDDINGS)
def test_embedding_sparse_ids(rng, name):
    """Keras's Embedding takes sparse ids (missing entries look up id 0);
    the LoRA embeddings give the same rows."""
    plain, lora, _ = pair(name, rng)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        ids = tf.SparseTensor([[0, 0], [1, 2]], [4, 7], (2, 3))
    else:
        import jax.experimental.sparse as jax_sparse

        ids = jax_sparse.BCOO(
            (np.array([4, 7]), np.array([[0, 0], [1, 2]])), shape=(2, 3)
        )
    assert_exact(to_numpy(lora(ids)), to_numpy(plain(ids)))


@pytest.mark.skipif(not RAGGED, reason=NO_RAGGED)
@pytest.mark.parametrize("name", EMBEDDINGS)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_embedding_ragged_ids(rng, name, mask_zero):
    """Keras's Embedding maps a tf.RaggedTensor of ids to a RaggedTensor
    (with a ragged mask under `mask_zero`), and a ragged `keras.Input` to a
    ragged output (keras-hub's ReversibleEmbedding: a dense spec); the LoRA
    embeddings do the same, with the same rows."""
    import tensorflow as tf

    plain, lora, _ = pair(name, rng, mask_zero=mask_zero)
    ids = tf.ragged.constant([[1, 0, 4], [7], [2, 3]])
    plain_out, lora_out = plain(ids), lora(ids)
    assert isinstance(plain_out, tf.RaggedTensor)
    assert isinstance(lora_out, tf.RaggedTensor)
    assert_exact(lora_out.row_lengths(), plain_out.row_lengths())
    assert_exact(lora_out.flat_values, plain_out.flat_values)
    plain_mask = getattr(plain_out, "_keras_mask", None)
    lora_mask = getattr(lora_out, "_keras_mask", None)
    assert (lora_mask is None) == (plain_mask is None)
    if plain_mask is not None:
        assert type(lora_mask) is type(plain_mask)
        assert_exact(to_numpy(lora_mask.flat_values), [1, 0, 1, 1, 1, 1])
    inputs = keras.Input((None,), dtype="int32", ragged=True)
    plain_sym, lora_sym = plain(inputs), lora(inputs)
    assert lora_sym.ragged == plain_sym.ragged
    assert lora_sym.shape == plain_sym.shape
    if name == "embedding":
        assert lora_sym.ragged


# -- The `weights=` argument ---------------------------------------------------


def test_embedding_weights_argument(rng):
    """Keras's Embedding takes its table as `weights=` (one array or a
    one-array list) and is built by the constructor; LoRAEmbedding too,
    with the same outputs."""
    table = rng.normal(size=(12, 5)).astype("float32")
    ids = _ids((2, 4))(rng)
    for weights in (table, [table]):
        plain = keras.layers.Embedding(12, 5, weights=weights, **TABLE_INIT)
        lora = kl.LoRAEmbedding(
            12, 5, rank=RANK, weights=weights, **TABLE_INIT, **FAST_A_INIT
        )
        assert lora.built and plain.built
        assert_exact(to_numpy(lora.embeddings), table)
        assert_exact(to_numpy(lora(ids)), to_numpy(plain(ids)))


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_weights_argument(rng, tie_weights):
    """keras-hub's ReversibleEmbedding (keras-hub 0.32) raises
    AttributeError when given `weights=`; LoRAReversibleEmbedding accepts
    its base tables there (`[embeddings]`, plus `reverse_embeddings` when
    untied) and then computes what the plain layer with those weights
    computes."""
    table = rng.normal(size=(12, 5)).astype("float32")
    weights = [table] if tie_weights else [table, table.T * 2.0]
    with pytest.raises(AttributeError, match="tie_weights"):
        keras_hub.layers.ReversibleEmbedding(
            12, 5, tie_weights=tie_weights, weights=weights
        )
    plain = keras_hub.layers.ReversibleEmbedding(
        12, 5, tie_weights=tie_weights, **TABLE_INIT
    )
    plain.build()
    plain.set_weights(weights)
    lora = kl.LoRAReversibleEmbedding(
        12, 5, tie_weights=tie_weights, rank=RANK, weights=weights, **TABLE_INIT
    )
    ids = _ids((2, 4))(rng)
    x = rng.normal(size=(3, 5)).astype("float32")
    assert_exact(to_numpy(lora(ids)), to_numpy(plain(ids)))
    assert_exact(
        to_numpy(lora(x, reverse=True)), to_numpy(plain(x, reverse=True))
    )


@pytest.mark.parametrize("name", ["dense", "einsum_dense", "conv2d"])
def test_weights_argument_refused_where_keras_refuses_it(rng, name):
    """Keras's Dense, EinsumDense and Conv2D take no `weights=` argument
    (ValueError: unrecognized keyword arguments); the LoRA layers refuse it
    the same way."""
    plain_factory, lora_factory = KINDS[name].plain, KINDS[name].lora
    weights = [np.ones((3, 3), "float32")]
    with pytest.raises(ValueError, match="Unrecognized keyword arguments"):
        plain_factory(weights=weights)
    with pytest.raises(ValueError, match="Unrecognized keyword arguments"):
        lora_factory(weights=weights)


# -- get_weights / set_weights -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_the_base_weights_plus_the_adapters(rng, name):
    """Keras's `weights` / `get_weights()` list a layer's variables; a LoRA
    layer's list holds the plain layer's base weights (same names, shapes
    and values) plus its adapters, and `count_params` counts both."""
    plain, lora, _ = pair(name, rng)
    base = lora.base_weights()
    adapters = lora.adapter_weights()
    assert sorted(w.name for w in lora.weights) == sorted(
        list(base) + list(adapters)
    )
    for weight in plain.weights:
        assert base[weight.name].shape == weight.shape
        assert_exact(to_numpy(base[weight.name]), to_numpy(weight))
    values = lora.get_weights()
    assert len(values) == len(lora.weights)
    for value, weight in zip(values, lora.weights, strict=True):
        assert_exact(value, to_numpy(weight))
    adapter_size = sum(int(np.prod(w.shape)) for w in adapters.values())
    assert lora.count_params() == plain.count_params() + adapter_size


@pytest.mark.parametrize("name", NAMES)
def test_set_weights_takes_the_full_list(rng, name):
    """Keras's `set_weights` takes one array per entry of `weights` and
    refuses a list of another length; a LoRA layer takes its full list
    (base weights and adapters) and so refuses the plain layer's shorter
    list. Setting the base weights by name (`base_weights()`, or
    `set_base_weights` on the embeddings) gives the plain layer's
    outputs."""
    plain, lora, x = pair(name, rng)
    set_adapters(lora, rng)
    other = lora_layer(name)
    other.build(x.shape)
    other.set_weights(lora.get_weights())
    assert_exact(to_numpy(other(x)), to_numpy(lora(x)))
    with pytest.raises(ValueError, match="expecting"):
        other.set_weights(plain.get_weights())
    fresh = lora_layer(name)
    fresh.build(x.shape)
    if name in EMBEDDINGS:
        fresh.set_base_weights(plain.get_weights())
    else:
        for weight in plain.weights:
            fresh.base_weights()[weight.name].assign(to_numpy(weight))
    assert_exact(to_numpy(fresh(x)), to_numpy(plain(x)))


def _made_by(how, name, rng):
    x = KINDS[name].inputs(rng)
    if how == "constructor":
        layer = lora_layer(name)
        layer.build(x.shape)
        return layer
    plain = plain_layer(name)
    plain.build(x.shape)
    if how == "from_layer":
        return type(lora_layer(name)).from_layer(plain, rank=RANK)
    model = keras.Sequential(
        [keras.Input(x.shape[1:], dtype=str(x.dtype)), plain]
    )
    lora_model = kl.apply_lora(model, rank=RANK, targets=[plain.name])
    return next(iter(kl.lora_layers(lora_model).values()))


@pytest.mark.parametrize(
    "how",
    [
        "constructor",
        "from_layer",
        "apply_lora",
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_get_weights_starts_with_the_base_weights(rng, name, how):
    """Keras's `get_weights()` gives a layer's weights in creation order
    (Dense: `[kernel, bias]`, so code reads the kernel as
    `get_weights()[0]`); a LoRA layer's list starts with the same base
    weights in the same order, however the layer was made."""
    layer = _made_by(how, name, rng)
    plain = plain_layer(name)
    plain.build(KINDS[name].inputs(rng).shape)
    names = [w.name for w in layer.weights]
    assert names[: len(plain.weights)] == [w.name for w in plain.weights]


# -- Constraints and regularizers ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_constraints_stay_on_the_base_variables(rng, name):
    """Keras puts `kernel_constraint` / `bias_constraint` /
    `embeddings_constraint` on the variables (`variable.constraint`); the
    LoRA layers keep them on the same base variables, and the adapters
    have none."""
    prefixes = KINDS[name].weights
    kwargs = {f"{p}_constraint": "non_neg" for p in prefixes}
    plain, lora, _ = pair(name, rng, **kwargs)
    base = lora.base_weights()
    for weight in plain.weights:
        constraint = base[weight.name].constraint
        assert type(constraint) is type(weight.constraint), weight.name
    # A depthwise conv's `depthwise_constraint` is on its `kernel`.
    weight_names = {
        "depthwise": "kernel" if "kernel" in base else "depthwise_kernel",
        "pointwise": "pointwise_kernel",
    }
    for prefix in prefixes:
        weight = base[weight_names.get(prefix, prefix)]
        assert isinstance(weight.constraint, keras.constraints.NonNeg)
    for weight in lora.adapter_weights().values():
        assert weight.constraint is None


def _regularized(name):
    return {
        **{f"{p}_regularizer": "l2" for p in KINDS[name].weights},
        "activity_regularizer": "l1",
    }


@pytest.mark.parametrize("name", NAMES)
def test_regularization_losses_are_a_frozen_plain_layers(rng, name):
    """Keras adds a weight regularizer's loss only for trainable weights,
    plus the activity regularizer's loss of the last call. A LoRA layer's
    base weights are frozen: its `losses` equal those of the plain layer
    with its base variables frozen (the activity loss only), so a
    trainable plain layer has one more loss per regularized weight."""
    plain, lora, x = pair(name, rng, **_regularized(name))
    plain(x)
    trainable_losses = len(plain.losses)
    for weight in plain.weights:
        weight.trainable = False
    plain(x)
    lora(x)
    assert len(lora.losses) == len(plain.losses) == 1
    for got, want in zip(lora.losses, plain.losses, strict=True):
        assert_exact(to_numpy(got), to_numpy(want))
    assert trainable_losses == 1 + len(KINDS[name].weights)


@pytest.mark.parametrize(
    "name",
    [
        "dense",
        "einsum_dense",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv2d_transpose",
        "depthwise_conv2d",
    ],
)
def test_train_bias_regularizes_the_bias(rng, name):
    """With `train_bias=True` the bias is trainable, so Keras's rule adds
    its `bias_regularizer` loss: the same losses as a plain layer whose
    kernel alone is frozen."""
    kwargs = _regularized(name)
    plain, _, x = pair(name, rng, **kwargs)
    lora = lora_layer(name, train_bias=True, **kwargs)
    lora.build(x.shape)
    copy_base(plain, lora)
    assert lora.bias.trainable and not lora.kernel.trainable
    plain.kernel.trainable = False
    plain(x)
    lora(x)
    assert len(lora.losses) == len(plain.losses) == 2
    assert_exact(
        sorted(float(to_numpy(v)) for v in lora.losses),
        sorted(float(to_numpy(v)) for v in plain.losses),
    )


# -- Configs and serialization -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(rng, name):
    """Keras's `from_config(get_config())` gives a layer with an equal
    config and, with the same weights, the same outputs. A LoRA layer's
    config is the plain layer's config (same values) plus the LoRA
    arguments, and round-trips the same way."""
    kwargs = {f"{p}_constraint": "non_neg" for p in KINDS[name].weights}
    plain, lora, x = pair(name, rng, **kwargs)
    set_adapters(lora, rng)
    config = lora.get_config()
    plain_config = plain.get_config()
    assert set(config) == set(plain_config) | set(LORA_CONFIG_KEYS)
    for key, value in plain_config.items():
        if key != "name":
            assert config[key] == value, key
    clone = type(lora).from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    clone.set_weights(lora.get_weights())
    assert_exact(to_numpy(clone(x)), to_numpy(lora(x)))


@pytest.mark.parametrize("name", NAMES)
def test_serialize_keras_object_round_trip(name):
    """`keras.saving.serialize_keras_object`, through JSON, and
    `deserialize_keras_object` give back a layer of the same class with an
    equal config, as for the plain layer."""
    for layer in (KINDS[name].plain(), KINDS[name].lora(alpha=4.0)):
        text = json.dumps(keras.saving.serialize_keras_object(layer))
        revived = keras.saving.deserialize_keras_object(json.loads(text))
        assert type(revived) is type(layer)
        assert revived.get_config() == layer.get_config()


# -- Dtype policies ------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_policies(rng, name, policy):
    """Keras's dtype policy sets the compute dtype, the variable dtype and
    the output dtype (which `compute_output_spec` predicts); the LoRA
    layers have the same, with the same base variable dtypes and outputs.
    The adapters are float32 under every policy."""
    plain, lora, x = pair(name, rng, dtype=policy)
    assert lora.compute_dtype == plain.compute_dtype
    assert lora.variable_dtype == plain.variable_dtype
    base = lora.base_weights()
    for weight in plain.weights:
        assert base[weight.name].dtype == weight.dtype
    for weight in lora.adapter_weights().values():
        assert weight.dtype == "float32"
    plain_out, lora_out = plain(x), lora(x)
    dtype = keras.backend.standardize_dtype(lora_out.dtype)
    assert dtype == keras.backend.standardize_dtype(plain_out.dtype)
    assert dtype == plain.compute_dtype
    assert lora.compute_output_spec(spec_of(x)).dtype == dtype
    assert_exact(
        to_numpy(keras.ops.cast(lora_out, "float32")),
        to_numpy(keras.ops.cast(plain_out, "float32")),
    )


# -- Loading variables and `.keras` files --------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_numeric_key_stores_are_refused(rng, name):
    """Keras's layers save and load their variables under numeric keys
    ("0", "1", ...); a LoRA layer saves them by name, and loading a plain
    layer's numeric-key store raises a ValueError naming the variables it
    expects and the keys it got, leaving the layer unchanged; wrapping the
    plain layer that loaded the store (`from_layer`) is the way in."""
    plain, lora, x = pair(name, rng)
    store = {}
    plain.save_own_variables(store)
    assert sorted(store) == [str(i) for i in range(len(plain.weights))]
    reloaded = plain_layer(name)
    reloaded.build(x.shape)
    reloaded.load_own_variables(store)
    assert_exact(to_numpy(reloaded(x)), to_numpy(plain(x)))
    # The way to adapt it: wrap the loaded plain layer.
    wrapped = type(lora).from_layer(reloaded, rank=RANK)
    assert_exact(to_numpy(wrapped(x)), to_numpy(plain(x)))
    before = to_numpy(lora(x))
    expected = sorted(w.name for w in lora.weights)
    with pytest.raises(ValueError, match=r"expected variables") as info:
        lora.load_own_variables(store)
    assert str(expected) in str(info.value)
    assert str(sorted(store)) in str(info.value)
    assert_exact(to_numpy(lora(x)), before)
    own = {}
    lora.save_own_variables(own)
    assert sorted(own) == expected


def _model_of(layer, x):
    inputs = keras.Input(x.shape[1:], dtype=str(x.dtype))
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_round_trip(rng, name, tmp_path):
    """A model saved as a `.keras` file loads with the same layer classes
    and outputs, as Keras's layers do; with trained (non-zero) adapters the
    reloaded outputs are exact and the base weights stay frozen."""
    _, lora, x = pair(name, rng)
    set_adapters(lora, rng)
    model = _model_of(lora, x)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[-1]
    assert type(layer) is type(lora)
    assert_exact(to_numpy(loaded(x)), to_numpy(model(x)))
    assert sorted(w.name for w in layer.trainable_weights) == sorted(
        lora.adapter_weights()
    )


# -- Trainable flags, build, count_params, models ------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_trainable_flags(rng, name):
    """Keras trains every weight of a trainable layer and none of a layer
    set `trainable=False`. A LoRA layer trains its adapters only (the base
    weights stay frozen); `trainable=False` freezes the adapters too, and
    `trainable=True` gives back the adapters, not the base weights. Keras's
    `trainable=False` constructor argument freezes everything, too."""
    plain, lora, x = pair(name, rng)
    adapters = sorted(lora.adapter_weights())
    assert sorted(w.name for w in plain.trainable_weights) == sorted(
        w.name for w in plain.weights
    )
    assert sorted(w.name for w in lora.trainable_weights) == adapters
    assert sorted(w.name for w in lora.non_trainable_weights) == sorted(
        lora.base_weights()
    )
    lora.trainable = False
    plain.trainable = False
    assert lora.trainable_weights == plain.trainable_weights == []
    assert len(lora.non_trainable_weights) == len(lora.weights)
    lora.trainable = True
    assert sorted(w.name for w in lora.trainable_weights) == adapters
    frozen = lora_layer(name, trainable=False)
    frozen.build(x.shape)
    assert frozen.trainable_weights == []
    frozen.trainable = True
    assert sorted(w.name for w in frozen.trainable_weights) == adapters


@pytest.mark.parametrize("name", NAMES)
def test_build_from_a_shape(rng, name):
    """Keras's `build(input_shape)` creates the weights without a call (and
    `get_build_config` / `build_from_config` repeat it); the LoRA layer
    gets base weights of the plain layer's shapes, no seed generator at
    dropout 0 (Keras's layers have none), and on torch one parameter per
    weight, as Keras checks."""
    shape = (None,) + KINDS[name].inputs(rng).shape[1:]
    plain, lora = plain_layer(name), lora_layer(name)
    plain.build(shape)
    lora.build(shape)
    assert lora.built
    base = lora.base_weights()
    for weight in plain.weights:
        assert base[weight.name].shape == weight.shape
    again = lora_layer(name)
    again.build_from_config(lora.get_build_config())
    assert [w.shape for w in again.weights] == [w.shape for w in lora.weights]
    seeds = [v for v in lora.variables if "seed" in v.name]
    assert seeds == [v for v in plain.variables if "seed" in v.name] == []
    if BACKEND == "torch":
        assert len(lora.torch_params) == len(lora.weights)


def test_dense_refuses_an_incompatible_input_like_keras():
    """Keras's Dense built for 3 features refuses 4 ("incompatible with the
    layer"); LoRADense does too."""
    for layer in (keras.layers.Dense(2), kl.LoRADense(2, rank=RANK)):
        layer(keras.KerasTensor((1, 3)))
        with pytest.raises(ValueError, match="incompatible with the layer"):
            layer(keras.KerasTensor((1, 4)))


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_sequential_and_functional_models(rng, name):
    """A Keras layer works in `keras.Sequential` and functional models
    (predict, count_params) and trains with `fit`; a LoRA layer in the same
    models predicts what the plain one does, counts its adapters as
    trainable parameters, and `fit` changes only the adapters."""
    plain, lora, x = pair(name, rng)
    spec = keras.Input(x.shape[1:], dtype=str(x.dtype))
    plain_seq = keras.Sequential([spec, plain])
    lora_seq = keras.Sequential([spec, lora])
    want = plain_seq.predict(x, verbose=0)
    assert_exact(lora_seq.predict(x, verbose=0), want)
    assert_exact(to_numpy(_model_of(lora, x)(x)), to_numpy(plain(x)))
    adapter_size = sum(
        int(np.prod(w.shape)) for w in lora.adapter_weights().values()
    )
    assert lora_seq.count_params() == plain_seq.count_params() + adapter_size
    trainable = sum(int(np.prod(w.shape)) for w in lora_seq.trainable_weights)
    assert trainable == adapter_size
    base = {n: to_numpy(w) for n, w in lora.base_weights().items()}
    lora_seq.compile(optimizer="sgd", loss="mse")
    lora_seq.fit(x, np.ones_like(want), batch_size=len(x), verbose=0)
    for weight_name, value in base.items():
        assert_exact(to_numpy(lora.base_weights()[weight_name]), value)
    assert np.any(to_numpy(lora.lora_b) != 0)
