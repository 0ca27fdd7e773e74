"""Classifier commands of the ``triage`` CLI: train, evaluate, data inspect, models list/activate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from classifier.data import DataError
from classifier.model import ModelLoadError
from classifier.registry import ModelStatus, RegistryError
from classifier.results import Backend, Quantize
from classifier.schema import SchemaError
from classifier.train_config import TrainConfig

data_app = typer.Typer(help="Explore and manage labeled data.", no_args_is_help=True)
models_app = typer.Typer(help="List and activate model versions in the registry.", no_args_is_help=True)

# What a command can expect to go wrong with its input: reported as one line and EXIT_USAGE (bot.cli
# reports them for every command of the `triage` app)
USER_ERRORS = (DataError, SchemaError, RegistryError, ModelLoadError, ValueError, FileNotFoundError)
EXIT_USAGE = 2  # bad input or configuration: nothing was done


def _registry() -> Any:
    from classifier.paths import registry_dir
    from classifier.registry import Registry

    return Registry(registry_dir())


def _schema(path: Path | None) -> Any:
    from classifier.schema import LabelSchema

    return LabelSchema.load(path) if path else LabelSchema()


def _split(value: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in value.replace(",", "/").split("/")]
    except ValueError:
        raise ValueError(f"--split must look like 80/10/10, got {value!r}") from None
    if len(parts) != 3 or sum(parts) <= 0:
        raise ValueError(f"--split needs three numbers (train/validation/test), got {value!r}")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def _max_length(value: str) -> int | Literal["auto"]:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--max-length must be a number of tokens or auto, got {value!r}") from None


DataOpt = Annotated[
    list[Path], typer.Option("--data", "-d", help="Labeled CSV or JSONL file; repeat for more.")
]
TextColumnOpt = Annotated[str, typer.Option(help="Name of the text column.")]
PACKAGED_MODEL = "the packaged all-MiniLM-L6-v2"


def train_command(
    data: DataOpt,
    base_model: Annotated[
        str, typer.Option(help="Local Hugging Face BERT folder.", show_default=PACKAGED_MODEL)
    ] = TrainConfig.base_model,
    from_version: Annotated[
        str | None, typer.Option(help="Continue training from this registry version.")
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="Label schema (YAML/JSON) with heads and labels; others are refused.")
    ] = None,
    infer_labels: Annotated[
        bool,
        typer.Option(
            help="Take each head's labels from the data. Without it: the data's labels when no model exists "
            "yet or when most of them are not starter labels, else the starter labels (the default schema)."
        ),
    ] = False,
    text_column: TextColumnOpt = "text",
    epochs: Annotated[
        int, typer.Option(min=1, help="Passes over the training data (fewer if early stopping ends it).")
    ] = TrainConfig.epochs,
    max_length: Annotated[
        str,
        typer.Option(
            help="Max sequence length in tokens (3-512), or auto: the shortest of 32/64/128/256/512 that "
            "keeps 95% of the training texts whole (what `triage data inspect` suggests)."
        ),
    ] = str(TrainConfig.max_length),
    batch_size: Annotated[
        int, typer.Option(min=1, help="Training examples per optimizer step.")
    ] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate of the encoder.")] = TrainConfig.learning_rate,
    head_lr: Annotated[
        float | None, typer.Option(help="Learning rate of the heads.")
    ] = TrainConfig.head_learning_rate,
    warmup: Annotated[float, typer.Option(help="Warmup share of the steps.")] = TrainConfig.warmup_ratio,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (not on the encoder's biases and norms).")
    ] = TrainConfig.weight_decay,
    patience: Annotated[
        int, typer.Option(help="Early stopping patience in epochs (0: off).")
    ] = TrainConfig.patience,
    class_weighting: Annotated[
        str, typer.Option(help="none, or balanced: classes weigh in the loss inversely to their counts.")
    ] = TrainConfig.class_weighting,
    seed: Annotated[
        int, typer.Option(help="Random seed: head initialisation, dropout and batch order.")
    ] = TrainConfig.seed,
    split: Annotated[str, typer.Option(help="train/validation/test shares.")] = "/".join(
        f"{share * 100:g}" for share in TrainConfig.split
    ),
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps.")
    ] = TrainConfig.max_steps,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = TrainConfig.device,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Fine-tune a multi-head model on labeled data and add it to the registry."""
    from classifier.data import fingerprint
    from classifier.train import train

    registry = _registry()
    examples, used_schema = _training_data(registry, data, schema, from_version, infer_labels, text_column)
    config = TrainConfig(
        base_model=base_model,
        init_from=from_version,
        max_length=_max_length(max_length),
        batch_size=batch_size,
        learning_rate=lr,
        head_learning_rate=head_lr,
        epochs=epochs,
        warmup_ratio=warmup,
        weight_decay=weight_decay,
        patience=patience,
        class_weighting=class_weighting,
        seed=seed,
        split=_split(split),
        max_steps=max_steps,
        device=device,
    )
    data_info = {"files": [{"path": str(p), "sha256": fingerprint(p)} for p in data]}
    result = train(examples, used_schema, config, registry, data_info=data_info, progress=not as_json)
    active = registry.active_name()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model_version": result.version.name,
                    "active": active == result.version.name,
                    "heads": result.version.metrics,
                }
            )
        )
        return
    from classifier.evaluate import format_report

    typer.echo(format_report(result.report))
    typer.echo(f"\nsaved {result.version.name} to {result.version.path}")
    if active == result.version.name:
        typer.echo(f"{result.version.name} is the active model (the first one trained)")
    else:
        typer.echo(f"active model stays {active}; `triage models activate {result.version.name}` to switch")


def _training_data(
    registry: Any,
    data: list[Path],
    schema_file: Path | None,
    from_version: str | None,
    infer_labels: bool,
    text_column: str,
) -> tuple[list[Any], Any]:
    """The examples and the schema to train them with: strict against a given schema (--schema, or the
    parent's when continuing from a version); otherwise the starter labels, or the data's own labels when
    there is no model yet or they clearly form a new set (said in one line)."""
    from classifier.data import load_examples, load_with_own_labels
    from classifier.schema import LabelSchema

    if schema_file or from_version or infer_labels:
        schema = (
            LabelSchema.from_dict(registry.get(from_version).schema)
            if from_version and not schema_file
            else _schema(schema_file)
        )
        return load_examples(data, schema, text_column=text_column, infer_labels=infer_labels)
    first_model = not registry.names()
    examples, schema, inferred = load_with_own_labels(
        data, LabelSchema(), text_column=text_column, first_model=first_model
    )
    if inferred:
        why = (
            f"no model in {registry.root} yet"
            if first_model
            else "not the starter labels of the default schema"
        )
        found = "; ".join(f"{h} = {', '.join(schema.heads[h])}" for h in inferred)
        typer.echo(f"labels taken from the data ({why}): {found}", err=True)
    return examples, schema


def evaluate_command(
    data: DataOpt,
    model: Annotated[
        str | None, typer.Option(help="Registry version.", show_default="the active one")
    ] = None,
    text_column: TextColumnOpt = "text",
    out: Annotated[
        Path | None, typer.Option(help="Folder for the report.", show_default="data dir/reports/...")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    backend: Annotated[
        Backend, typer.Option(help="torch, or onnx (ONNX Runtime, as served on the CPU); auto: onnx")
    ] = "torch",
    quantize: Annotated[
        Quantize, typer.Option(help="onnx precision: none, int8, or auto (int8 if its held-out check passed)")
    ] = "auto",
) -> None:
    """Evaluate a model version on labeled data: metrics, confusion matrices, ROC, calibration, errors."""
    from classifier.data import load_examples
    from classifier.evaluate import evaluate_version, format_report
    from classifier.model import MultiHeadClassifier
    from classifier.paths import data_dir
    from classifier.schema import LabelSchema

    registry = _registry()
    info = registry.get(model) if model else registry.active()
    # the model's labels, extended by unknown ones so that they are reported as errors, not rejected
    model_schema, _, _ = MultiHeadClassifier.load_parts(Path(info.path))
    schema = LabelSchema(heads=model_schema.heads, allow_new_labels=True)
    examples, _ = load_examples(data, schema, text_column=text_column)
    out_dir = out or data_dir() / "reports" / f"evaluate-{info.name}-{Path(data[0]).stem}"
    report = evaluate_version(info, examples, backend, quantize, out_dir=out_dir, progress=not as_json)
    if as_json:
        for head, unknown in report["left_out"].items():
            typer.echo(
                f"warning: {head}: {sum(unknown.values())} row(s) left out (labels {info.name} "
                f"does not know: {', '.join(unknown)})",
                err=True,
            )
        sys.stdout.write(json.dumps(report) + "\n")
        return
    typer.echo(format_report(report))
    typer.echo(f"\nreport, plots and wrong predictions in {out_dir}")


@data_app.command("inspect")
def inspect_command(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="CSV or JSONL files.")],
    text_column: TextColumnOpt = "text",
    base_model: Annotated[str, typer.Option(help="Tokenizer folder.", show_default=PACKAGED_MODEL)] = "",
    out: Annotated[Path | None, typer.Option(help="Folder for summary and plots.")] = None,
) -> None:
    """Label distribution per head, text lengths in tokens, and a suggested max sequence length."""
    from classifier.explore import format_summary, inspect_files
    from classifier.paths import data_dir, default_base_model

    out_dir = out or data_dir() / "reports" / f"inspect-{files[0].stem}"
    summary = inspect_files(
        files, Path(base_model) if base_model else default_base_model(), out_dir, text_column=text_column
    )
    typer.echo(format_summary(summary, ", ".join(f.name for f in files)))
    typer.echo(f"\nsummary and plots in {out_dir}")


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print the versions as one JSON list.")] = False,
) -> None:
    """Show every version with its metrics; the active one is marked."""
    from dataclasses import asdict

    versions = _registry().list()
    if as_json:
        typer.echo(json.dumps([asdict(v) for v in versions]))
        return
    if not versions:
        typer.echo("no model versions yet: train one with `triage train --data FILE`")
        return
    from classifier.evaluate import too_few_rows

    for v in versions:
        mark = "*" if v.status == ModelStatus.ACTIVE else " "
        scores = "  ".join(
            f"{h}: acc {m['accuracy']:.3f} F1 {m['macro_f1']:.3f} (n={m['n']})" for h, m in v.metrics.items()
        )
        typer.echo(f"{mark} {v.name:<5} {v.status:<9} {v.created}  {scores}")
        for head, m in v.metrics.items():
            if warning := too_few_rows(m):
                typer.echo(f"        {head}: {warning}")
        if v.reason and v.status != ModelStatus.ACTIVE:
            typer.echo(f"        {v.reason}")


@models_app.command("activate")
def models_activate(
    version: Annotated[str, typer.Argument(help="Version name, e.g. v3.")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Activate even if the version lacks heads the active one has.")
    ] = False,
) -> None:
    """Make a version the active model (running servers switch to it without a restart)."""
    from classifier.schema import describe_lost_heads, lost_heads

    registry = _registry()
    target = registry.get(version)
    active = registry.active_name()
    lost = lost_heads(registry.get(active).schema, target.schema) if active else []
    if lost:
        typer.echo(f"warning: {version} lacks head(s) the active {active} has: {', '.join(lost)}", err=True)
        for line in describe_lost_heads(lost):
            typer.echo(f"  {line}", err=True)
        if not yes:
            typer.confirm(f"Activate {version} anyway?", abort=True, err=True)
    info = registry.activate(version, reason="activated from the command line")
    typer.echo(f"{info.name} is now the active model")


def register(app: typer.Typer) -> None:
    from classifier.server import serve_command

    app.command("train")(train_command)
    app.command("serve")(serve_command)
    app.command("evaluate")(evaluate_command)
    app.add_typer(data_app, name="data")
    app.add_typer(models_app, name="models")
