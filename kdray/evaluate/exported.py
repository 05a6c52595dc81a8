"""An exported model evaluated beside its PyTorch original: the evaluate stage's ``exported: [onnx]``.

``kdray export ARTIFACT --format onnx`` writes ``exports/onnx/<weights sha256[:16]>/model.onnx`` and
records it in the artifact's ``exports.json`` (file, sha256, the weights it was exported from). The
evaluate stage reads that file back (checked against its sha256 and against the artifact's current
weights), runs it in onnxruntime on the same normalised test inputs as the PyTorch model, and reports
its accuracy, its agreement with PyTorch's predictions, the largest logit difference and its latency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdray.contracts.checkpoint import Artifact, sha256
from kdray.core.errors import CheckpointMismatch, KdrayError
from kdray.core.metrics import metrics_for
from kdray.evaluate.export import Runner, read_exports
from kdray.evaluate.latency import as_row, measure


def onnx_record(art: Artifact) -> tuple[dict[str, Any], bytes]:
    """The artifact's ONNX export record (``kdray.evaluate.export`` owns ``exports.json``) and the file's
    bytes, checked; a clear error when there is none."""
    home = art.home or art.store
    hint = f"Export it first: kdray export {art.uri} --format onnx"
    record = read_exports(art)["exports"].get("onnx")  # a damaged record: an ExportError naming it
    if not isinstance(record, dict):
        raise KdrayError(f"evaluate exported: [onnx]: {art.uri} has no ONNX export", hint=hint)
    if record.get("weights_sha256") != art.weights_sha256:
        raise KdrayError(
            f"evaluate exported: [onnx]: the ONNX export of {art.uri} was made from other weights "
            f"({str(record.get('weights_sha256'))[:12]}, the artifact holds {str(art.weights_sha256)[:12]})",
            hint=hint,
        )
    data = home.read_bytes(record["file"])
    if sha256(data) != record.get("sha256"):
        raise CheckpointMismatch(
            f"{home.uri(record['file'])} does not match its export record (sha256 {sha256(data)[:12]})",
            hint=hint,
        )
    return record, data


def onnx_scores(
    art: Artifact,
    x: torch.Tensor,
    y: torch.Tensor,
    torch_logits: torch.Tensor,
    *,
    batch_size: int,
    latency_batch: int,
    latency_batches: int,
) -> dict[str, Any]:
    """The ONNX export's figures on the test inputs ``x`` (normalised), beside PyTorch's ``torch_logits``."""
    record, data = onnx_record(art)
    run = Runner("onnx", data, threads=torch.get_num_threads())
    logits = torch.from_numpy(
        np.concatenate([run(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)])
    )
    scores = metrics_for(logits, y)
    xb = x[:latency_batch].float()
    timing = measure(lambda: run(xb), latency_batches)  # warm-up and repeats, as for the PyTorch latency
    return {
        "onnx_top1": scores["top1"],
        "onnx_loss": scores["loss"],
        "onnx_agreement": float((logits.argmax(1) == torch_logits.argmax(1)).float().mean()),
        "onnx_max_abs_diff": float((logits - torch_logits).abs().max()),
        **as_row(timing, "onnx_"),
        "onnx_uri": record.get("uri"),
    }
