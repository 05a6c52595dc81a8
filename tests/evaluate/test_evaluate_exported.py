"""An evaluate stage that includes a model's ONNX export beside the PyTorch model (no Ray: workers 0)."""

from __future__ import annotations

import pytest
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import KdrayError
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.evaluate.export import export_artifact


def later(tmp_path, uri, **evaluate):
    return parse_pipeline(
        {
            "name": "later",
            "storage": {"uri": f"file://{tmp_path}/later"},
            "stages": [{"name": "eval", "kind": "evaluate", "models": [uri], **evaluate}],
        }
    )


def test_the_onnx_export_is_evaluated_beside_pytorch(tmp_path):
    (teacher,) = run_pipeline(parse_pipeline(synthetic_pipeline(tmp_path)), log=lambda m: None)
    plain = later(tmp_path, teacher.uri)
    assert "exported" not in plain.stages[0].model_dump(mode="json"), "unset: the stage key is as before"
    with pytest.raises(KdrayError, match="has no ONNX export"):
        run_pipeline(later(tmp_path, teacher.uri, exported=["onnx"]), log=lambda m: None)

    export_artifact(teacher.uri, "onnx")
    (outcome,) = run_pipeline(later(tmp_path, teacher.uri, exported=["onnx"]), log=lambda m: None)
    report = open_artifact(outcome.uri)
    (row,) = report.read_json("report.json")["models"]
    assert row["onnx_top1"] == pytest.approx(row["top1"], abs=1e-6) and row["onnx_agreement"] == 1.0
    assert row["onnx_max_abs_diff"] <= 1e-4 and row["onnx_latency_ms"] > 0
    assert "onnx top-1" in report.read_bytes("report.md").decode()
