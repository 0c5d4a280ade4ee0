"""`LoRAConfig`: the LoRA arguments of an adapter, validated once.

Layers, `apply_lora`, saved plans and adapter files all describe an adapter
by the same seven arguments; this frozen object checks them once (with
Keras-style messages naming the argument and the value) and is passed
around from then on.
"""

import dataclasses
import math
import numbers

#: Keras's own LoRA arguments, refused by keras_lora layers.
KERAS_LORA_ARGUMENTS = ("lora_rank", "lora_alpha")


def _is_real_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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

    Raises:
        ValueError: `rank` is not a positive integer (bools are refused),
            `alpha` is not a positive finite number, or `dropout` is not in
            [0, 1).
        TypeError: `use_rslora` or `train_bias` is not a bool.

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
        for name in ("use_rslora", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"`{name}` must be a bool. "
                    f"Received: {name}={getattr(self, name)!r}"
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
        arguments: the constructor's `locals()`: its seven LoRA arguments
            (by `LoRAConfig`'s field names) and `kwargs`, from which Keras's
            own `lora_rank` / `lora_alpha` are refused first.
    """
    refuse_keras_lora_arguments(arguments["kwargs"])
    return LoRAConfig(
        **{f.name: arguments[f.name] for f in dataclasses.fields(LoRAConfig)}
    )
