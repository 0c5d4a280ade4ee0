"""A report of what `apply_lora` adapted, in the style of `model.summary()`."""

import collections.abc
import io
import math

import keras
from rich.console import Console
from rich.table import Table

from keras_lora.convert import lora_class_for
from keras_lora.walk import iter_layers
from keras_lora.walk import lora_layers


def _count(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def lora_report(model: keras.Model) -> dict:
    """Returns what was adapted, as data.

    Args:
        model: a model returned by `keras_lora.apply_lora`.

    Returns:
        A dict with `layers`: a list of `{"path", "class", "rank", "alpha",
        "scaling", "use_rslora", "params"}` (params: the adapter's numbers,
        `(d_in + d_out) * rank` per factor pair), and the totals
        `adapter_params`, `trainable_params`, `total_params` and
        `trainable_percent` (trainable / total * 100). Shared variables are
        counted once. `unbuilt_layers` lists the paths of layers of a kind
        keras_lora adapts that the model never built (never calls); they
        are left alone.
    """
    rows = []
    for path, layer in lora_layers(model).items():
        rows.append(
            {
                "path": path,
                "class": type(layer).__name__,
                "rank": layer.adapter_rank,
                "alpha": layer.adapter_alpha,
                "scaling": layer.scaling,
                "use_rslora": layer.use_rslora,
                "params": _count(layer.adapter_weights().values()),
            }
        )
    trainable = _count(model.trainable_weights)
    total = _count(model.weights)
    return {
        "layers": rows,
        "adapter_params": sum(row["params"] for row in rows),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "unbuilt_layers": [
            path
            for path, layer in iter_layers(model)
            if not layer.built and lora_class_for(layer) is not None
        ],
    }


def lora_summary(
    model: keras.Model, print_fn: collections.abc.Callable | None = None
) -> None:
    """Prints a table of the adapted layers and the parameter totals.

    Args:
        model: a model returned by `keras_lora.apply_lora`.
        print_fn: optional callable taking the rendered text; defaults to
            printing to the terminal (rich), as `model.summary()` does.

    Returns:
        The report dict of `lora_report(model)`.
    """
    report = lora_report(model)
    table = Table(title=f'LoRA adapters of "{model.name}"')
    for column in ("Layer path", "Class", "rank", "alpha", "scaling", "Params"):
        table.add_column(
            column,
            justify="left" if column in ("Layer path", "Class") else "right",
        )
    for row in report["layers"]:
        table.add_row(
            row["path"],
            row["class"],
            str(row["rank"]),
            f"{row['alpha']:g}",
            f"{row['scaling']:g}" + (" (rs)" if row["use_rslora"] else ""),
            f"{row['params']:,}",
        )
    footer = (
        f"Adapter params: {report['adapter_params']:,}\n"
        f"Trainable params: {report['trainable_params']:,} / "
        f"{report['total_params']:,} total "
        f"({report['trainable_percent']:.4f}%)"
    )
    console = Console(file=io.StringIO(), record=True, width=110)
    console.print(table)
    console.print(footer)
    text = console.export_text()
    if print_fn is None:
        print(text)
    else:
        print_fn(text)
    return report
