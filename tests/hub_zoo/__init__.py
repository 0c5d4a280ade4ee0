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


@dataclasses.dataclass(frozen=True)
class Case:
    """A backbone factory and its inputs.

    Attributes:
        build: `() -> keras_hub.models.<X>Backbone`, a new model each call.
        inputs: `() -> input structure` (NumPy arrays) for that model.
        slow: bool, True for cases that take more than a few seconds.
        note: str, anything a reader of the test results should know.
    """

    build: Callable
    inputs: Callable
    slow: bool = False
    note: str = ""


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
