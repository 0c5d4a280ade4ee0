"""Train step against Hugging Face PEFT on PyTorch (optional comparison).

The same all-MiniLM-L6-v2 weights are trained two ways in one process:

- Keras (torch backend): keras-hub's `BertBackbone`, as `benchmarks.train_step`
  builds it: `keras_lora`, the built-in LoRA, full fine-tuning and the floor
  (only the layer norms train), `train_on_batch` with Adam.
- Hugging Face: `transformers.BertModel` (no pooler) loaded from the same
  files, as PEFT LoRA (`peft.get_peft_model`), full fine-tuning and the same
  floor, one `torch.optim.Adam` step per call (`zero_grad`, forward, mean
  squared error, `backward`, `step`).

Same batch, targets, loss, learning rate, rank 8 and scaling 1 (`alpha =
rank` in both), LoRA dropout 0, the models' own dropout on, GELU's tanh
approximation in both (keras-hub's BERT uses it); all seven
variants interleaved round by round (the order rotating). The ratios split
keras_lora's distance to PEFT into the frameworks' own cost (Keras full /
HF full, Keras floor / HF floor: attention kernels, dispatch) and the LoRA
branch's cost over each framework's floor (keras_lora / Keras floor against
PEFT / HF floor). Before timing, the forward passes (inference mode) of the
two frameworks are compared on the batch: the plain models, and keras_lora's
model with non-zero adapters against PEFT's with the same adapters (written
by `keras_lora.peft.save_peft_adapter`, loaded by PEFT). Keras and PyTorch
get the batch as tensors made once, outside the timed steps.

Needs `transformers` and `peft` (requirements-bench.txt; not dependencies of
keras_lora) and `KERAS_BACKEND=torch`:

    KERAS_BACKEND=torch python -m benchmarks.peft_compare --quick
    python -m benchmarks.peft_compare --table
"""

from benchmarks import common

#: Per size: (batch, sequence length) of the MiniLM batch, the target sets,
#: rank, warm-up calls and timed rounds.
SIZES = {
    "smoke": dict(
        batch=(2, 8),
        targets=("qv", "all_linear"),
        rank=4,
        warmup=1,
        steps=2,
    ),
    "quick": dict(
        batch=(16, 128),
        targets=("qv", "all_linear"),
        rank=8,
        warmup=1,
        steps=7,
    ),
}
SIZES["full"] = dict(SIZES["quick"], warmup=2, steps=25)

#: PEFT `target_modules` (module-name suffixes of `BertModel` without its
#: pooler) of the Keras target sets in `common.TARGET_SETS["qv"/"all_linear"]`:
#: query + value, and every projection of the blocks (`dense` is the
#: attention output, intermediate and output projections).
PEFT_TARGETS = {
    "qv": ["query", "value"],
    "all_linear": ["query", "key", "value", "dense"],
}

KERAS_VARIANTS = ("keras_lora", "builtin", "full", "floor")
HF_VARIANTS = ("peft", "hf_full", "hf_floor")


def check_backend():
    """Raises unless Keras runs on PyTorch and transformers / peft import."""
    common.require_backend(
        "torch", "peft_compare", "compares against PEFT on PyTorch"
    )
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "benchmarks.peft_compare needs transformers and peft, which are "
            "benchmark-only requirements: pip install -r "
            f"requirements-bench.txt ({error})"
        ) from error


def hf_model(variant, rank, targets, seed=0):
    """A fresh Hugging Face `BertModel` of the MiniLM weights as `variant`,
    and its trainable parameters."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    # keras-hub's BertBackbone uses GELU's tanh approximation; the same
    # activation here makes the two models compute the same function.
    model = transformers.BertModel.from_pretrained(
        common.minilm_dir(),
        add_pooling_layer=False,
        hidden_act="gelu_pytorch_tanh",
        local_files_only=True,
    )
    if variant == "peft":
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=PEFT_TARGETS[targets],
        )
        model = peft.get_peft_model(model, config)
    elif variant == "hf_floor":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "LayerNorm" in name
    elif variant != "hf_full":
        raise ValueError(
            f"`variant` must be one of {HF_VARIANTS}. Received: {variant!r}"
        )
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def hf_step_function(model, parameters, x, y, learning_rate=1e-4):
    """One Adam step of `model` on the batch (mean squared error of the last
    hidden state), as a callable returning the loss as a float."""
    import torch

    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    inputs = {
        "input_ids": torch.as_tensor(x["token_ids"], dtype=torch.long),
        "token_type_ids": torch.as_tensor(x["segment_ids"], dtype=torch.long),
        "attention_mask": torch.as_tensor(x["padding_mask"], dtype=torch.long),
    }
    target = torch.as_tensor(y)

    def step():
        optimizer.zero_grad(set_to_none=True)
        output = model(**inputs).last_hidden_state
        loss = torch.nn.functional.mse_loss(output, target)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def adapted_forward_difference(keras_model, x, rank):
    """Max abs difference between the keras_lora model, with non-zero
    adapters, and PEFT's model of the same weights with those adapters
    (written by `keras_lora.peft.save_peft_adapter`, loaded by PEFT's
    `PeftModel.from_pretrained` into a fresh `BertModel`), in inference
    mode."""
    import tempfile

    import peft

    from keras_lora.peft import save_peft_adapter

    common.randomize_adapters(keras_model, scale=0.05)
    hf, _ = hf_model("hf_full", rank, "qv")
    with tempfile.TemporaryDirectory() as directory:
        save_peft_adapter(keras_model, directory, architecture="bert")
        adapted = peft.PeftModel.from_pretrained(hf, directory)
    return forward_difference(keras_model, adapted, x)


def forward_difference(keras_model, hf, x):
    """Max abs difference of the two frameworks' inference-mode outputs."""
    import numpy as np
    import torch

    hf.eval()
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.as_tensor(x["token_ids"], dtype=torch.long),
            token_type_ids=torch.as_tensor(x["segment_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(x["padding_mask"], dtype=torch.long),
        ).last_hidden_state.numpy()
    hf.train()
    ours = np.asarray(keras_model.predict_on_batch(x))
    return float(np.max(np.abs(ours - theirs)))


def bench_targets(targets, batch, rank, warmup, steps):
    """Times the seven variants of one target set; returns its result dict."""
    import keras
    import torch

    batch_size, seq_len = batch
    functions, facts = {}, {}
    keras_models = {}
    backbone = None
    for variant in KERAS_VARIANTS:
        model, backbone, facts[variant] = common.build_variant(
            "minilm", variant, rank, targets=targets
        )
        keras_models[variant] = model
    x, y = common.make_batch("minilm", backbone, batch_size, seq_len)
    # Both frameworks get tensors made once, outside the timed steps.
    x_tensors = {k: keras.ops.convert_to_tensor(v) for k, v in x.items()}
    y_tensor = keras.ops.convert_to_tensor(y)
    for variant, model in keras_models.items():
        functions[variant] = lambda m=model: m.train_on_batch(
            x_tensors, y_tensor
        )
    hf_models = {}
    for variant in HF_VARIANTS:
        common.log(f"building minilm / {variant} (rank {rank}, {targets})")
        model, parameters = hf_model(variant, rank, targets)
        hf_models[variant] = model
        facts[variant] = {
            "trainable_params": sum(p.numel() for p in parameters),
            "total_params": sum(p.numel() for p in model.parameters()),
        }
        functions[variant] = hf_step_function(model, parameters, x, y)
    facts["peft"]["adapted_layers"] = sum(
        1
        for _, module in hf_models["peft"].named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    )
    difference = forward_difference(
        keras_models["full"], hf_models["hf_full"], x
    )
    adapted_difference = adapted_forward_difference(
        keras_models["keras_lora"], x, rank
    )
    times = common.interleaved_times(functions, warmup, steps)
    ratio = common.ratio_stats
    return {
        "model": "minilm",
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "targets": targets,
        "peft_target_modules": PEFT_TARGETS[targets],
        "warmup": warmup,
        "steps": steps,
        "forward_max_abs_difference": difference,
        "adapted_forward_max_abs_difference": adapted_difference,
        "hf_attention": hf_models["hf_full"].config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "variants": {
            v: {**facts[v], **common.time_stats(times[v]), "times_s": times[v]}
            for v in functions
        },
        "ratios": {
            "keras_lora/peft": ratio(times["keras_lora"], times["peft"]),
            "builtin/peft": ratio(times["builtin"], times["peft"]),
            "full/hf_full": ratio(times["full"], times["hf_full"]),
            "floor/hf_floor": ratio(times["floor"], times["hf_floor"]),
            "keras_lora/floor": ratio(times["keras_lora"], times["floor"]),
            "peft/hf_floor": ratio(times["peft"], times["hf_floor"]),
            "keras_lora/builtin": ratio(times["keras_lora"], times["builtin"]),
        },
    }


def run(size="full", device="cpu"):
    """Runs the comparison in this process; returns the result dict."""
    common.check_device(device)
    check_backend()
    import peft
    import transformers

    spec = SIZES[size]
    rows = [
        bench_targets(
            targets, spec["batch"], spec["rank"], spec["warmup"], spec["steps"]
        )
        for targets in spec["targets"]
    ]
    for row in rows:
        r = row["ratios"]
        # Each framework's LoRA cost over its own floor, in the floor's
        # time: from the median of the per-round ratios and from the ratio
        # of the median times (the two differ by the run's noise).
        row["lora_cost_over_floor"] = {
            "keras_lora": r["keras_lora/floor"]["median"] - 1,
            "peft": r["peft/hf_floor"]["median"] - 1,
        }
        row["lora_cost_over_floor_of_medians"] = {
            "keras_lora": r["keras_lora/floor"]["of_medians"] - 1,
            "peft": r["peft/hf_floor"]["of_medians"] - 1,
        }
        row["meets_targets"] = {
            "lora_cost<=peft_lora_cost": all(
                cost["keras_lora"] <= cost["peft"]
                for cost in (
                    row["lora_cost_over_floor"],
                    row["lora_cost_over_floor_of_medians"],
                )
            ),
            "keras_lora/peft<=1.0": r["keras_lora/peft"]["median"] <= 1.0,
        }
    return {
        "benchmark": "peft_compare",
        "size": size,
        "versions": {
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "machine": common.machine_info(device),
        "results": rows,
    }


def table(out_dir="benchmarks/results", device="cpu"):
    """The Markdown table of docs/performance.md from the JSON result: each
    ratio as the median of the per-round ratios and, in parentheses, the
    ratio of the median times."""
    result = common.results_by_backend(out_dir, "peft_compare", device)
    lines = [
        "| targets | keras_lora / PEFT | built-in / PEFT | Keras full / HF "
        "full | Keras floor / HF floor | **keras_lora / Keras floor** | "
        "**PEFT / HF floor** | median step ms: keras_lora / PEFT / Keras "
        "floor / HF floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["torch"]["results"]:
        r, v = row["ratios"], row["variants"]
        ms = " / ".join(
            f"{1000 * v[name]['median_s']:.0f}"
            for name in ("keras_lora", "peft", "floor", "hf_floor")
        )
        cells = [row["targets"]]
        for key in (
            "keras_lora/peft",
            "builtin/peft",
            "full/hf_full",
            "floor/hf_floor",
            "keras_lora/floor",
            "peft/hf_floor",
        ):
            cell = f"{r[key]['median']:.2f} ({r[key]['of_medians']:.2f})"
            if key in ("keras_lora/floor", "peft/hf_floor"):
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append(ms)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_result(result):
    machine = result["machine"]
    print(
        f"\nkeras_lora vs PEFT, backend {machine['backend']} on "
        f"{machine['device']} ({machine['cpu_model']}, "
        f"{machine['usable_cpus']} cpus), transformers "
        f"{result['versions']['transformers']}, peft "
        f"{result['versions']['peft']}"
    )
    header = [
        "targets",
        "forward diff",
        "adapted diff",
        *KERAS_VARIANTS,
        *HF_VARIANTS,
    ]
    rows = [
        [
            row["targets"],
            f"{row['forward_max_abs_difference']:.1e}",
            f"{row['adapted_forward_max_abs_difference']:.1e}",
            *(
                f"{row['variants'][v]['median_s']:.4f}"
                for v in (*KERAS_VARIANTS, *HF_VARIANTS)
            ),
        ]
        for row in result["results"]
    ]
    common.print_table(header, rows)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        action="store_true",
        help="print docs/performance.md's table from the JSON in --out",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out, args.device))
        return None
    common.setup_device(args.device)
    result = run(args.size, args.device)
    print_result(result)
    path = common.write_json(result, args.out, "peft_compare")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
