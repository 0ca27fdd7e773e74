"""ONNX Runtime backend: a version's whole model (encoder, pooling, heads, softmax) as one ONNX graph.

Made once per version and kept in its folder::

    vN/onnx/
      fp32.onnx       torch.onnx.export of the model, dynamic batch and sequence axes
      int8.onnx       the same with dynamic int8 quantization (weights int8, activations quantized per call)
      report.json     the int8 check: accuracy of both on the version's held-out split, and the verdict

The folder appears only complete (built in a scratch folder, then renamed), under a file lock, so two
processes loading the same version export it once. Int8 is served by default only when it costs at most
``MAX_INT8_ACCURACY_DROP`` of accuracy on every head of the held-out split; without held-out rows
(a version trained on no test split) it is not checked and fp32 is served.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from classifier.data import Example, read_jsonl
from classifier.model import ModelLoadError, MultiHeadClassifier, pad_batch, predict_probs
from classifier.registry import VersionFiles, VersionInfo
from classifier.results import Backend, Quantize
from classifier.schema import LabelSchema

log = logging.getLogger(__name__)

Precision = Literal["fp32", "int8"]
MAX_INT8_ACCURACY_DROP = 0.005  # half a point of accuracy, on any head
OPSET = 17
POOLED = "pooled"  # the graph's output after the heads: the embedding the heads read


@dataclass
class OnnxReport:
    """What ``report.json`` records about a version's ONNX files."""

    heldout_rows: int
    accuracy: dict[str, dict[str, float]]  # precision -> head -> accuracy on the held-out split
    max_accuracy_drop: float | None  # fp32 minus int8, worst head; None when not checked
    int8_ok: bool  # int8 is the default precision of this version
    reason: str
    seconds: float  # export, quantization and check together
    created: str

    @classmethod
    def read(cls, folder: Path) -> OnnxReport:
        raw = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


def resolve_backend(backend: Backend, quantize: Quantize, device: torch.device) -> Literal["torch", "onnx"]:
    """The backend ``backend`` means on ``device``; ValueError for a combination that cannot run."""
    resolved = backend if backend != "auto" else ("onnx" if device.type == "cpu" else "torch")
    if resolved == "onnx" and device.type != "cpu":
        raise ValueError(f"the onnx backend runs on the CPU, not {device}: use backend torch there")
    if resolved == "torch" and quantize == "int8":
        raise ValueError("int8 quantization needs the onnx backend")
    return resolved


def onnx_folder(version_dir: Path) -> Path:
    return VersionFiles(Path(version_dir)).onnx


def heldout_examples(info: VersionInfo) -> list[Example]:
    """The held-out rows a version was judged on at training time (the test split of its dataset)."""
    dataset = info.files.dataset
    if not dataset.is_file():
        return []
    return info.split(read_jsonl(dataset))[info.data.get("test_split", "test")]


def ensure_onnx(info: VersionInfo) -> OnnxReport:
    """The version's ONNX files, made now unless already there (blocking: export takes seconds)."""
    version_dir = Path(info.path)
    folder = onnx_folder(version_dir)
    with FileLock(str(version_dir / ".onnx.lock"), timeout=600):
        if (folder / "report.json").is_file():
            return OnnxReport.read(folder)
        for stale in version_dir.glob(".onnx-*"):  # left by a process killed while exporting
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        scratch = Path(tempfile.mkdtemp(prefix=".onnx-", dir=version_dir))
        try:
            _export(version_dir, scratch / "fp32.onnx")
            _quantize(scratch / "fp32.onnx", scratch / "int8.onnx")
            report = _check_int8(version_dir, scratch, heldout_examples(info))
            report.seconds = round(time.monotonic() - started, 1)
            (scratch / "report.json").write_text(
                json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8"
            )
            os.rename(scratch, folder)  # the folder appears complete or not at all
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("made the ONNX files of %s in %.1f s: %s", info.name, report.seconds, report.reason)
    return report


class _Probabilities(torch.nn.Module):
    """The model as torch.onnx.export sees it: ids and mask in, each head's probabilities out, then the
    pooled embedding (``POOLED``, for why-this-label; fetched only by calls that ask for it)."""

    def __init__(self, model: MultiHeadClassifier) -> None:
        super().__init__()
        self.model = model
        self.heads = list(model.schema.heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = self.model.pool(input_ids, attention_mask)  # dropout is off in eval mode
        probs = [torch.softmax(self.model.heads[h](pooled).float(), dim=-1) for h in self.heads]
        return (*probs, pooled)


def _export(version_dir: Path, target: Path) -> None:
    model, tokenizer, _ = MultiHeadClassifier.load(version_dir)
    heads = list(model.schema.heads)
    # Padded example rows: the traced graph keeps the attention-mask path that padding needs.
    rows = tokenizer(["warm up", "a longer example message to export"])["input_ids"]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id or 0)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter (dynamo=False) needs no onnxscript and traces BERT reliably; its
        # tracer warnings are about shape checks that hold for every input here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Probabilities(model).eval(),
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(target),
            input_names=["input_ids", "attention_mask"],
            output_names=[*heads, POOLED],
            dynamic_axes={**axes, **{h: {0: "batch"} for h in [*heads, POOLED]}},
            opset_version=OPSET,
            dynamo=False,
        )


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _QuietQuantizer()
    logging.getLogger().addFilter(quiet)
    try:
        # Per-channel weight scales: on a BANKING77 model, one scale per tensor cost 1.2 points of
        # held-out accuracy, one per output channel nothing.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.getLogger().removeFilter(quiet)


class _QuietQuantizer(logging.Filter):
    """The quantizer logs on the root logger: a line per attention MatMul it skips and per tensor without
    parameters (37 lines for MiniLM, in the middle of `triage up`'s output), and advice to run shape-
    inference pre-processing, which dynamic int8 does not need. Its warnings about anything else stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        advice = "pre-processing before quantization" in record.getMessage()
        return record.levelno >= logging.WARNING and not advice


def _check_int8(version_dir: Path, folder: Path, heldout: Sequence[Example]) -> OnnxReport:
    schema, tokenizer, max_length = MultiHeadClassifier.load_parts(version_dir)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not heldout:
        return OnnxReport(0, {}, None, False, "no held-out rows to check int8 on: fp32", 0.0, created)
    texts = [ex.text for ex in heldout]
    accuracy: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "int8"):
        model = OnnxModel(folder, precision, schema)
        probs = model.predict_probs(tokenizer, texts, max_length)
        accuracy[precision] = accuracy_by_head(schema, heldout, probs)
    drop = max((accuracy["fp32"][h] - accuracy["int8"][h] for h in accuracy["fp32"]), default=0.0)
    ok = drop <= MAX_INT8_ACCURACY_DROP
    reason = (
        f"int8 loses {drop * 100:.2f} points of accuracy on {len(heldout)} held-out rows "
        f"(at most {MAX_INT8_ACCURACY_DROP * 100:g} allowed): {'int8' if ok else 'fp32'}"
    )
    return OnnxReport(len(heldout), accuracy, drop, ok, reason, 0.0, created)


def accuracy_by_head(
    schema: LabelSchema, examples: Sequence[Example], probs: dict[str, np.ndarray]
) -> dict[str, float]:
    """Accuracy of each head over the examples labeled for it."""
    out = {}
    for head, labels in schema.heads.items():
        rows = [i for i, ex in enumerate(examples) if ex.labels.get(head) in labels]
        if rows:
            truth = np.array([labels.index(examples[i].labels[head]) for i in rows])
            out[head] = float((probs[head][rows].argmax(axis=1) == truth).mean())
    return out


class OnnxModel:
    """An ONNX Runtime session over one of a version's files; thread-safe (``run`` may be called
    from several threads)."""

    def __init__(
        self, folder: Path, precision: Precision, schema: LabelSchema, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: tokenization and the event loop need those cores meanwhile.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precision = precision
        self.schema = schema
        self.session = ort.InferenceSession(
            str(folder / f"{precision}.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Each head's class probabilities for a right-padded batch."""
        outputs = self.session.run(
            list(self.schema.heads), {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return dict(zip(self.schema.heads, outputs, strict=True))

    @property
    def has_pooled(self) -> bool:
        """Whether the graph outputs the pooled embedding (files made before it did: no)."""
        return POOLED in {output.name for output in self.session.get_outputs()}

    def with_pooled(
        self, input_ids: np.ndarray, attention_mask: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each head's probabilities and the pooled embeddings, from one run."""
        *outputs, pooled = self.session.run(
            [*self.schema.heads, POOLED], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return dict(zip(self.schema.heads, outputs, strict=True)), pooled

    def predict_probs(
        self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
    ) -> dict[str, np.ndarray]:
        """``classifier.model.predict_probs`` on this session (as the engine serves it, on the CPU)."""
        return predict_probs(self, self.schema, tokenizer, texts, max_length, torch.device("cpu"))


def load_onnx(info: VersionInfo, quantize: Quantize, threads: int | None = None) -> OnnxModel:
    """Make the version's ONNX files if needed and open the precision asked for (``auto``: int8 when its
    check passed)."""
    schema, _, _ = MultiHeadClassifier.load_parts(Path(info.path))
    try:
        report = ensure_onnx(info)
        precision: Precision = (
            "int8" if quantize == "int8" or (quantize == "auto" and report.int8_ok) else "fp32"
        )
        return OnnxModel(onnx_folder(Path(info.path)), precision, schema, threads)
    except ModelLoadError:
        raise
    except Exception as exc:  # an export or ONNX Runtime failure: the version cannot be served this way
        raise ModelLoadError(f"{info.path}: cannot serve it on ONNX Runtime: {exc}") from exc
