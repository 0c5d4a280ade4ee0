"""`LoRAConfig`: the LoRA arguments of an adapter, validated once.

Layers, `apply_lora`, saved plans and adapter files all describe an adapter
by the same nine arguments; this frozen object checks them once (with
Keras-style messages naming the argument and the value) and is passed
around from then on.
"""

import dataclasses
import math
import numbers

import keras
from keras.initializers import Zeros

#: Keras's own LoRA arguments, refused by keras_lora layers.
KERAS_LORA_ARGUMENTS = ("lora_rank", "lora_alpha")

#: The adapter initializations (`init`): `"default"` takes the A and B
#: initializers; `"gaussian"` is PEFT's `init_lora_weights="gaussian"`;
#: `"pissa"` and `"olora"` factor the base weight (see
#: `keras_lora.layers.inits`).
INITS = ("default", "gaussian", "pissa", "olora")

#: The initializations whose adapter starts non-zero: the base weight
#: becomes the residual `W - s * A0 @ B0`.
RESIDUAL_INITS = ("pissa", "olora")


def magnitude_name(a_name):
    """The name of the DoRA magnitude of the adapter pair whose A is
    `a_name`: `lora_a` -> `lora_magnitude`, `depthwise_lora_a` ->
    `depthwise_lora_magnitude`, `reverse_lora_a` -> `reverse_lora_magnitude`.
    """
    return a_name[: -len("lora_a")] + "lora_magnitude"


def _is_real_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_zeros(initializer):
    """Whether `initializer` is Keras's `"zeros"` (by name, object or
    serialized config)."""
    try:
        return isinstance(keras.initializers.get(initializer), Zeros)
    except (TypeError, ValueError):
        return False


def validate_rank(rank):
    """Returns `rank` as an int, or raises a `ValueError` naming it."""
    if (
        not isinstance(rank, numbers.Integral)
        or isinstance(rank, bool)
        or rank <= 0
    ):
        raise ValueError(
            f"`rank` must be a positive integer. Received: rank={rank!r}"
        )
    return int(rank)


def lora_scaling(rank, alpha, use_rslora):
    """`alpha / rank` (LoRA, eq. 4) or `alpha / sqrt(rank)` (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def refuse_keras_lora_arguments(kwargs):
    """Raises if `kwargs` holds Keras's built-in `lora_rank`/`lora_alpha`;
    removes them (as `None`) otherwise."""
    for key in KERAS_LORA_ARGUMENTS:
        value = kwargs.pop(key, None)
        if value is not None:
            raise ValueError(
                f"`{key}` is Keras's built-in LoRA; keras_lora layers take "
                f"`rank` and `alpha`. Received: {key}={value!r}"
            )


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The LoRA arguments of one adapter (Hu et al. 2021, arXiv:2106.09685).

    Args:
        rank: int, the rank r of A (d_in, r) and B (r, d_out). Defaults to
            `8`.
        alpha: positive float or `None` (= `rank`). The update is scaled by
            `alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`.
        dropout: float in [0, 1), dropout on the branch input. Defaults to
            `0.0`.
        use_rslora: bool, rsLoRA scaling (Kalajdzievski 2023,
            arXiv:2312.03732). Defaults to `False`.
        lora_a_initializer: initializer for A, or `None` for the layer
            class's default (`default_lora_a_initializer`).
        lora_b_initializer: initializer for B. Defaults to `"zeros"`, so a
            new adapter leaves the output unchanged.
        train_bias: bool, whether the base layer's bias trains too.
            Defaults to `False`.
        use_dora: bool, DoRA (Liu et al. 2024, arXiv:2402.09353): a
            trainable float32 magnitude per output unit rescales the adapted
            weight, `m * (W + s * A @ B) / ||W + s * A @ B||`. Defaults to
            `False`.
        init: str, how the adapter starts. `"default"`: A from
            `lora_a_initializer`, B from `lora_b_initializer`. `"gaussian"`:
            A ~ N(0, (1/rank)^2), B = 0 (PEFT's `"gaussian"`). `"pissa"`
            (arXiv:2404.02948) and `"olora"` (arXiv:2406.01775): A and B
            from the SVD / QR of the base weight, which is replaced by the
            residual (`keras_lora.layers.inits`). Defaults to `"default"`.

    Raises:
        ValueError: `rank` is not a positive integer (bools are refused),
            `alpha` is not a positive finite number, or `dropout` is not in
            [0, 1).
        TypeError: `use_rslora`, `train_bias` or `use_dora` is not a bool.
        ValueError: `init` is not one of `INITS`, or it sets A (any but
            `"default"`) together with a given `lora_a_initializer`, or B
            (`"pissa"`, `"olora"`) together with a `lora_b_initializer`
            other than `"zeros"`.

    Examples:
        >>> from keras_lora.layers.config import LoRAConfig
        >>> LoRAConfig(rank=4, alpha=8).scaling
        2.0
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    lora_a_initializer: object = None
    lora_b_initializer: object = "zeros"
    train_bias: bool = False
    init: str = "default"
    use_dora: bool = False

    def __post_init__(self):
        rank = validate_rank(self.rank)
        alpha = rank if self.alpha is None else self.alpha
        if not _is_real_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                "`alpha` must be a positive finite number or None. "
                f"Received: alpha={self.alpha!r}"
            )
        if not _is_real_number(self.dropout) or not 0.0 <= self.dropout < 1:
            raise ValueError(
                "`dropout` must be a float in [0, 1). "
                f"Received: dropout={self.dropout!r}"
            )
        for name in ("use_rslora", "train_bias", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"`{name}` must be a bool. "
                    f"Received: {name}={getattr(self, name)!r}"
                )
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(
                f"`init` must be one of {INITS}. Received: init={self.init!r}"
            )
        if self.init != "default" and self.lora_a_initializer is not None:
            raise ValueError(
                f"`init={self.init!r}` sets A itself; it cannot be combined "
                "with `lora_a_initializer`. Received: lora_a_initializer="
                f"{self.lora_a_initializer!r}"
            )
        if self.init in RESIDUAL_INITS and not _is_zeros(
            self.lora_b_initializer
        ):
            raise ValueError(
                f"`init={self.init!r}` sets B itself; it cannot be combined "
                "with `lora_b_initializer`. Received: lora_b_initializer="
                f"{self.lora_b_initializer!r}"
            )
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def resolved_alpha(self):
        """`alpha`, or `rank` where `alpha` is `None` (kept as `None`, so
        `replace(rank=...)` still means alpha = the new rank)."""
        return self.rank if self.alpha is None else self.alpha

    @property
    def scaling(self):
        """The factor `s` in `W + s * A @ B`."""
        return lora_scaling(self.rank, self.resolved_alpha, self.use_rslora)

    def replace(self, **changes):
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def layer_config(arguments):
    """A LoRA layer constructor's `LoRAConfig`.

    Args:
        arguments: the constructor's `locals()`: its nine LoRA arguments
            (by `LoRAConfig`'s field names) and `kwargs`, from which Keras's
            own `lora_rank` / `lora_alpha` are refused first.
    """
    refuse_keras_lora_arguments(arguments["kwargs"])
    return LoRAConfig(
        **{f.name: arguments[f.name] for f in dataclasses.fields(LoRAConfig)}
    )
