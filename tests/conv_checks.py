"""Checks shared by the convolution oracle tests: the plain Keras layer's
output at init, then the adapted, merged and in-place merged outputs."""

import keras
import numpy as np
import pytest
from numerics import assert_close
from numerics import assert_exact
from numerics import close


def np_(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def plain_output(layer, x, backend_quirk):
    """The plain Keras layer's output with `layer`'s base weights, which the
    LoRA layer at init (B = 0) must equal exactly; or None where the plain
    layer raises on this backend (TensorFlow's CPU kernels lack some
    channels_first / grouped convolutions): then the LoRA layer must raise
    the same."""
    cls = type(layer)
    plain = cls.base_class.from_config(layer.base_config())
    plain.build(x.shape)
    plain.set_weights([np_(w) for w in layer.base_weights().values()])
    try:
        plain_out = np_(plain(x))
    except Exception as error:
        backend_quirk(
            f"plain {cls.base_class.__name__} raises",
            layer.get_config(),
            f"{type(error).__name__}: {str(error).splitlines()[0][:160]}",
        )
        with pytest.raises(type(error)):
            layer(x)
        return None
    assert_exact(np_(layer(x)), plain_out)  # B = 0: the base output
    return plain_out


def check_outputs(layer, merged, x, plain_out, base_ref, unmerged, quirk):
    """The adapted output equals the unmerged NumPy oracle (unless the plain
    layer itself disagrees with the base oracle, a backend bug, recorded);
    the merged layer and an in-place merge give it too, and unmerging gives
    it back bit for bit."""
    out = np_(layer(x))
    if close(plain_out, base_ref):
        assert_close(out, unmerged)
    else:
        quirk(
            f"plain {type(layer).base_class.__name__} differs from the NumPy "
            "oracle",
            layer.get_config(),
            f"max abs diff {np.abs(plain_out - base_ref).max():.3g}",
        )
    assert_close(np_(merged(x)), out)
    layer.merge_adapter()
    assert_close(np_(layer(x)), out)
    layer.unmerge_adapter()
    assert_exact(np_(layer(x)), out)
