"""The adapter state contract of docs/adapters.md, as properties over
random sequences of operations.

A NumPy model of the state (each adapter's A, B and alpha, in order, and
which one is active) is updated by every operation; after each, the LoRA
model must agree with it exactly (names, active adapter, every adapter's
tensors) and in its outputs (a NumPy oracle), and the model given to
`apply_lora` must keep its outputs bit for bit.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from numerics import assert_close
from numerics import assert_exact

import keras_lora as kl
from keras_lora import multi

PATHS = ("dense", "out")
SHAPES = {"dense": (8, 4), "out": (4, 3)}
RANK = 2


def base_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


class Reference:
    """What the adapter state must be: `{name: {"alpha", path: (A, B)}}`
    in order, and the active name."""

    def __init__(self, model, alpha):
        self.model = model
        self.adapters = {"default": self.read_active(alpha)}
        self.active = "default"

    def read_active(self, alpha):
        entry = {"alpha": alpha}
        for path, layer in kl.lora_layers(self.model).items():
            entry[path] = (to_numpy(layer.lora_a), to_numpy(layer.lora_b))
        return entry

    def copy(self):
        other = Reference.__new__(Reference)
        other.model = self.model
        other.adapters = {n: dict(e) for n, e in self.adapters.items()}
        other.active = self.active
        return other

    def oracle(self, x, kernels, disabled=False):
        """x through both Dense layers with the active adapter (NumPy)."""
        entry = self.adapters[self.active]
        h = x.astype("float64")
        for path in PATHS:
            kernel, bias = kernels[path]
            y = h @ kernel + bias
            if not disabled:
                a, b = entry[path]
                y = y + (entry["alpha"] / RANK) * (h @ a) @ b
            h = y
        return h


def random_adapter(rng):
    return {
        f"{path}.{var}": rng.normal(scale=0.3, size=shape).astype("float32")
        for path in PATHS
        for var, shape in (
            ("lora_a", (SHAPES[path][0], RANK)),
            ("lora_b", (RANK, SHAPES[path][1])),
        )
    }


def as_entry(tensors, alpha):
    entry = {"alpha": alpha}
    for path in PATHS:
        entry[path] = (tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"])
    return entry


def check(model, ref, x, kernels, original, original_out):
    """Every invariant of the contract."""
    assert_exact(to_numpy(original(x)), original_out)
    assert multi.list_adapters(model) == list(ref.adapters)
    assert multi.active_adapter(model) == ref.active
    for name, entry in ref.adapters.items():
        tensors = multi.adapter_tensors(model, name)
        for path in PATHS:
            assert_exact(tensors[f"{path}.lora_a"], entry[path][0])
            assert_exact(tensors[f"{path}.lora_b"], entry[path][1])
    assert {
        layer.adapter_alpha for layer in kl.lora_layers(model).values()
    } == {ref.adapters[ref.active]["alpha"]}
    assert_close(to_numpy(model(x)), ref.oracle(x, kernels))


class Ops:
    """The operations, each applied to the model and to the reference."""

    def __init__(self, model, ref, rng, tmp_path, original):
        self.model, self.ref, self.rng = model, ref, rng
        self.tmp_path, self.original = tmp_path, original
        self.count = 0

    def new_name(self):
        self.count += 1
        return f"a{self.count}"

    def add(self):
        name = self.new_name()
        tensors = random_adapter(self.rng)
        multi.add_adapter(self.model, name, tensors)
        # A dict adapter takes the layers' current alpha.
        alpha = self.ref.adapters[self.ref.active]["alpha"]
        self.ref.adapters[name] = as_entry(tensors, alpha)

    def add_file(self):
        """An adapter trained elsewhere with another alpha."""
        name = self.new_name()
        alpha = float(self.rng.choice([1.0, 4.0, 8.0]))
        other = kl.apply_lora(base_model(), rank=RANK, alpha=alpha)
        tensors = random_adapter(self.rng)
        for path, layer in kl.lora_layers(other).items():
            for var, variable in layer.adapter_weights().items():
                variable.assign(tensors[f"{path}.{var}"])
        path = self.tmp_path / f"{name}.safetensors"
        kl.save_adapters(other, path)
        multi.add_adapter(self.model, name, path)
        self.ref.adapters[name] = as_entry(tensors, alpha)

    def switch(self):
        name = str(self.rng.choice(list(self.ref.adapters)))
        multi.set_active_adapter(self.model, name)
        self.ref.active = name

    def train(self):
        """New values for the active adapter's variables."""
        tensors = random_adapter(self.rng)
        for path, layer in kl.lora_layers(self.model).items():
            for var, variable in layer.adapter_weights().items():
                variable.assign(tensors[f"{path}.{var}"])
        alpha = self.ref.adapters[self.ref.active]["alpha"]
        self.ref.adapters[self.ref.active] = as_entry(tensors, alpha)

    def fit(self):
        """A real training step: only the active adapter changes."""
        x = self.rng.normal(size=(4, 8)).astype("float32")
        y = self.rng.normal(size=(4, 3)).astype("float32")
        self.model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        self.model.fit(x, y, epochs=1, verbose=0)
        alpha = self.ref.adapters[self.ref.active]["alpha"]
        self.ref.adapters[self.ref.active] = self.ref.read_active(alpha)

    def delete(self):
        others = [n for n in self.ref.adapters if n != self.ref.active]
        if not others:
            return
        name = str(self.rng.choice(others))
        multi.delete_adapter(self.model, name)
        del self.ref.adapters[name]

    def save_load(self):
        """Every adapter saved; loaded into the original (a new adapted
        model) and back into the model itself: the same state."""
        path = self.tmp_path / f"all{self.count}.safetensors"
        self.count += 1
        kl.save_adapters(self.model, path)
        fresh = kl.load_adapters(self.original, path)
        assert fresh is not self.original
        assert multi.list_adapters(fresh) == list(self.ref.adapters)
        assert multi.active_adapter(fresh) == self.ref.active
        for name, entry in self.ref.adapters.items():
            tensors = multi.adapter_tensors(fresh, name)
            for p in PATHS:
                assert_exact(tensors[f"{p}.lora_b"], entry[p][1])
        kl.load_adapters(self.model, path)

    def merge(self):
        """`merge` gives a plain model of the active adapter; in-place
        merging of a clone is refused, changing nothing."""
        x = self.rng.normal(size=(2, 8)).astype("float32")
        expected = to_numpy(self.model(x))
        merged = kl.merge(self.model)
        assert not kl.lora_layers(merged)
        assert_close(to_numpy(merged(x)), expected)
        with pytest.raises(ValueError, match="shares its base weights"):
            kl.merge_adapters(self.model)

    def disable(self, kernels, x, depth=0):
        """Inside: the base model, whatever is done; after: as found."""
        found = self.ref.copy()
        inner = Ops(self.model, self.ref, self.rng, self.tmp_path, None)
        inner.count = self.count + 100 * (depth + 1)
        try:
            with multi.disable_adapters(self.model):
                for _ in range(int(self.rng.integers(1, 4))):
                    kind = str(
                        self.rng.choice(
                            [
                                "add",
                                "add_file",
                                "switch",
                                "delete",
                                "nest",
                                "raise",
                            ]
                        )
                    )
                    if kind == "nest" and depth < 1:
                        inner.disable(kernels, x, depth + 1)
                    elif kind == "raise":
                        raise RuntimeError("inside disable_adapters")
                    elif kind != "nest":
                        getattr(inner, kind)()
                    assert_close(
                        to_numpy(self.model(x)),
                        self.ref.oracle(x, kernels, disabled=True),
                    )
        except RuntimeError as error:
            assert "inside disable_adapters" in str(error)
        self.ref.adapters, self.ref.active = found.adapters, found.active


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adapter_state_contract_over_random_sequences(seed, tmp_path):
    """Random sequences of add, switch, train, fit, delete, disable (nested,
    with exceptions and changes inside), save/load and merge keep the model
    equal to the reference state, and the model given to apply_lora its
    outputs."""
    rng = np.random.default_rng(seed)
    original = base_model()
    x = rng.normal(size=(3, 8)).astype("float32")
    original_out = to_numpy(original(x))
    kernels = {
        p: (
            to_numpy(original.get_layer(p).kernel).astype("float64"),
            to_numpy(original.get_layer(p).bias).astype("float64"),
        )
        for p in PATHS
    }
    model = kl.apply_lora(original, rank=RANK, alpha=4.0)
    ref = Reference(model, 4.0)
    ops = Ops(model, ref, rng, tmp_path, original)
    ops.train()
    kinds = [
        "add", "add_file", "switch", "switch", "train", "fit", "delete",
        "disable", "save_load", "merge",
    ]  # fmt: skip
    history = []
    for _ in range(18):
        kind = str(rng.choice(kinds))
        history.append(kind)
        if kind == "disable":
            ops.disable(kernels, x)
        else:
            getattr(ops, kind)()
        check(model, ref, x, kernels, original, original_out)
    assert len(set(history)) >= 6, history


def test_trained_head_and_bias_are_the_clones_own(tmp_path):
    """`trainable_layers` and `train_bias=True` train copies in the clone:
    the model given to apply_lora keeps its outputs through fit."""
    rng = np.random.default_rng(0)
    original = base_model()
    x = rng.normal(size=(4, 8)).astype("float32")
    before = to_numpy(original(x))
    model = kl.apply_lora(
        original, rank=RANK, targets=["dense"], trainable_layers=["out"],
        train_bias=True,
    )  # fmt: skip
    trainable = sorted(v.path for v in model.trainable_weights)
    assert trainable == [
        "dense/bias",
        "dense/lora_a",
        "dense/lora_b",
        "out/bias",
        "out/kernel",
    ]
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(x, rng.normal(size=(4, 3)), epochs=3, verbose=0)
    head = model.get_layer("out")
    assert not np.array_equal(
        to_numpy(head.kernel), to_numpy(original.get_layer("out").kernel)
    )
    assert_exact(to_numpy(original(x)), before)
    # The frozen kernel is still shared, not copied.
    assert model.get_layer("dense").kernel is original.get_layer("dense").kernel


def test_a_head_made_trainable_after_adding_adapters_is_refused():
    """Rule 2 also holds when something is unfrozen after the adapters were
    added: switching and mixed batches refuse, naming it."""
    model = kl.apply_lora(base_model(), rank=RANK, targets=["dense"])
    multi.add_adapter(model, "b")
    model.get_layer("out").trainable = True
    for operation in (
        lambda: multi.set_active_adapter(model, "b"),
        lambda: multi.add_adapter(model, "c"),
        lambda: multi.mixed_batch_call(
            model, np.ones((2, 8), "float32"), np.array([0, 1], "int32")
        ),
    ):
        with pytest.raises(ValueError, match=r"also trains \['out/kernel'"):
            operation()
    assert multi.list_adapters(model) == ["default", "b"]
    assert multi.active_adapter(model) == "default"


def test_saving_inside_disable_adapters_is_refused(tmp_path):
    """Inside disable_adapters every B is zero: saving there (adapter
    files, `.keras`) would store the disabled state as the adapter, so it
    raises and writes nothing."""
    model = kl.apply_lora(base_model(), rank=RANK)
    with multi.disable_adapters(model):
        with pytest.raises(ValueError, match="inside `keras_lora.multi"):
            kl.save_adapters(model, tmp_path / "a.safetensors")
        with pytest.raises(ValueError, match="cannot save inside"):
            model.save(tmp_path / "m.keras")
    assert not (tmp_path / "a.safetensors").exists()
    kl.save_adapters(model, tmp_path / "a.safetensors")


def two_adapters(inplace=False):
    """Adapters "default" and "b", both non-zero, on both Dense layers."""
    model = kl.apply_lora(base_model(), rank=RANK, alpha=4.0, inplace=inplace)
    rng = np.random.default_rng(0)
    for path, value in random_adapter(rng).items():
        layer_path, _, name = path.rpartition(".")
        getattr(kl.lora_layers(model)[layer_path], name).assign(value)
    multi.add_adapter(model, "b", random_adapter(rng))
    return model


X = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")


def test_predict_inside_and_after_a_mixed_batch_follows_it():
    """A compiled predict run inside mixed_batch computes the mix, and after
    the block the active adapter again (never the other's ids)."""
    model = two_adapters()
    expected = {}
    for name in ("b", "default"):
        multi.set_active_adapter(model, name)
        expected[name] = to_numpy(model(X))
    model.predict(X, verbose=0, batch_size=4)
    with multi.mixed_batch(model, np.array([1, 1, 0, 1], "int32")):
        mixed = model.predict(X, verbose=0, batch_size=4)
    assert_close(mixed[[0, 1, 3]], expected["b"][[0, 1, 3]])
    assert_close(mixed[2], expected["default"][2])
    assert_close(model.predict(X, verbose=0, batch_size=4), expected["default"])


def test_disabled_stays_disabled_whatever_is_loaded_or_mixed(tmp_path):
    """Inside disable_adapters a loaded adapter stays disabled, and a
    disable opened inside a mixed batch refuses the mix."""
    model = kl.apply_lora(base_model(), rank=RANK)
    for path, value in random_adapter(np.random.default_rng(0)).items():
        layer_path, _, name = path.rpartition(".")
        getattr(kl.lora_layers(model)[layer_path], name).assign(value)
    with_adapter = to_numpy(model(X))
    kl.save_adapters(model, tmp_path / "one.safetensors")
    with multi.disable_adapters(model):
        base = to_numpy(model(X))
        kl.load_adapters(model, tmp_path / "one.safetensors")
        assert_exact(to_numpy(model(X)), base)
    assert_exact(to_numpy(model(X)), with_adapter)
    model = two_adapters()
    with multi.mixed_batch(model, np.array([0, 1, 0, 1], "int32")):
        with multi.disable_adapters(model):
            with pytest.raises(ValueError, match="inside `disable_adapters`"):
                model(X)


def test_switching_a_model_merged_in_place_is_refused():
    """set_active_adapter on a model merged in place would leave the merged
    adapter computing: refused, nothing changed."""
    model = two_adapters(inplace=True)
    kl.merge_adapters(model)
    merged_out = to_numpy(model(X))
    with pytest.raises(ValueError, match="merged in place"):
        multi.set_active_adapter(model, "b")
    assert multi.active_adapter(model) == "default"
    assert_exact(to_numpy(model(X)), merged_out)


def test_a_failed_load_leaves_a_plain_model_as_it_was(tmp_path):
    """load_adapters into a plain model that fails (a NaN value) leaves the
    model's trainable flags (and outputs) as they were."""
    model = kl.apply_lora(base_model(), rank=RANK)
    layer = kl.lora_layers(model)["dense"]
    layer.lora_b.assign(np.full(layer.lora_b.shape, np.nan, "float32"))
    kl.save_adapters(model, tmp_path / "nan.safetensors")
    plain = base_model()
    before = to_numpy(plain(X))
    with pytest.raises(ValueError, match="non-finite"):
        kl.load_adapters(plain, tmp_path / "nan.safetensors")
    assert len(plain.trainable_weights) == 4
    assert_exact(to_numpy(plain(X)), before)


def test_optimizer_state_belongs_to_each_adapter():
    """Momentum (and step count) are kept per adapter: training "b" after
    training "default" gives what training "b" alone gives."""
    y = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")

    def compiled():
        model = two_adapters()
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse"
        )
        return model

    alone = compiled()
    multi.set_active_adapter(alone, "b")
    alone.fit(X, y, epochs=2, verbose=0)
    after = compiled()
    after.fit(X, -y, epochs=3, verbose=0)
    multi.set_active_adapter(after, "b")
    after.fit(X, y, epochs=2, verbose=0)
    for key, value in multi.adapter_tensors(alone, "b").items():
        assert_close(multi.adapter_tensors(after, "b")[key], value)
    # "default" resumes with its own momentum: equal to training it in one go.
    one_go = compiled()
    one_go.fit(X, -y, epochs=5, verbose=0)
    multi.set_active_adapter(after, "default")
    after.fit(X, -y, epochs=2, verbose=0)
    for key, value in multi.adapter_tensors(one_go, "default").items():
        assert_close(multi.adapter_tensors(after, "default")[key], value)


def test_added_arrays_are_copied_and_numpy_weights_combine():
    """add_adapter keeps its own copy of given arrays; combine_adapters takes
    NumPy scalars as weights."""
    model = two_adapters()
    given = random_adapter(np.random.default_rng(5))
    kept = {k: v.copy() for k, v in given.items()}
    multi.add_adapter(model, "c", given)
    for value in given.values():
        value += 1.0
    for key, value in multi.adapter_tensors(model, "c").items():
        assert_exact(value, kept[key])
    multi.combine_adapters(model, {"b": np.float32(0.5), "c": 0.5}, "mix")
    assert "mix" in multi.list_adapters(model)
    with pytest.raises(ValueError, match="non-negative"):
        multi.combine_adapters(model, {"b": float("nan")}, "bad")


def test_layer_merge_and_outer_models_reset_compiled_functions():
    """layer.merge_adapter() / unmerge_adapter() reset the compiled predict
    of the models holding the layer, a wrapper only ever given to
    `lora_layers` included: predict never applies the adapter twice."""
    model = two_adapters(inplace=True)
    inputs = keras.Input((8,))
    outer = keras.Model(inputs, model(inputs))
    kl.lora_layers(outer)
    expected = to_numpy(model(X))
    for m in (model, outer):
        m.predict(X, verbose=0)
    for layer in kl.lora_layers(model).values():
        layer.merge_adapter()
    for m in (model, outer):
        assert_close(m.predict(X, verbose=0), expected)
    for layer in kl.lora_layers(model).values():
        layer.unmerge_adapter()
    for m in (model, outer):
        assert_close(m.predict(X, verbose=0), expected)
