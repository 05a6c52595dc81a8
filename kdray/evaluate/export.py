"""Export a trained model out of kdray: ONNX (checked with onnxruntime), TorchScript, or a Hugging Face folder.

    kdray export runs/fmnist/student/<key> --format onnx

rebuilds the model from the artifact's manifest (weights checked against their sha256), exports
it with a dynamic batch axis, then checks the export: it runs the exported model on a seeded batch
(another batch size than the one traced, so the batch axis is really dynamic) and compares the
outputs with PyTorch's (the largest absolute difference must be within ``tolerance``; an export
that fails the check is not written). It measures the exported model's latency next to PyTorch's
and writes ``exports/<format>/<weights sha256[:16]>/model.onnx`` (or ``model.pt``) under the
artifact folder, then ``exports.json`` (the record of every export: file, sha256, check, latency,
versions) last and atomically. The artifact's own manifest and files are left as they are.
A model that cannot be exported is a ``KdrayError`` naming the operator that failed.

``--format hf`` (a student built from ``model.hf`` or ``model.hf_config``) writes a folder that
``transformers``' ``from_pretrained`` loads without kdray: ``config.json``, ``model.safetensors`` and a
``preprocessor_config.json`` saying the input size and normalisation the network expects. It is
checked by loading it back with ``from_pretrained`` and comparing its logits with kdray's on a seeded
batch (:func:`export_hf`); the folder is ``exports/hf/<weights sha256[:16]>/``.
"""

from __future__ import annotations

import importlib.metadata as md
import io
import json
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from kdray.contracts.checkpoint import Artifact, open_artifact, sha256
from kdray.core.errors import KdrayError

EXPORTS = "exports.json"
FORMATS = ("onnx", "torchscript", "hf")
FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "hf": ""}  # hf: a folder
OPSET = 18


class ExportError(KdrayError):
    """A model that cannot be exported, or an export that does not match PyTorch."""


def failing_operator(error: BaseException) -> str | None:
    """The operator an exporter names in its error (``aten::foo``, ``aten.foo.default``, ``ns::op``)."""
    text = f"{error}\n{error.__cause__ or ''}"
    for pattern in (
        r"operator '?([A-Za-z_][\w.:]*)'?",
        r"\b(aten(?:::|\.)\w+(?:\.\w+)?)",
        r"\b([A-Za-z_]\w*::\w+(?:\.\w+)?)",
        r"\b([A-Za-z_]\w*\.\w+\.default)\b",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _need_onnx() -> Any:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx and onnxruntime packages ({e.name} is not installed)",
            hint="Install them: pip install 'kdray[export]'.",
        ) from None
    return onnxruntime


def _median_ms(call: Callable[[], Any], runs: int) -> float:
    for _ in range(2):  # warm-up
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def to_onnx(model: nn.Module, example: torch.Tensor, name: str = "model") -> bytes:
    """The model as ONNX bytes (input ``input`` with a dynamic batch axis, output ``logits``)."""
    _need_onnx()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buf,  # type: ignore[arg-type]  # the TorchScript-based exporter writes to a file object too
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as e:  # the exporters raise many types; each becomes one clear error
        op = failing_operator(e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"{name} cannot be exported to ONNX: operator {op or '(not named by the exporter)'} failed ({first[:300]})",
            hint="Replace that operator in the model with one ONNX supports (data-dependent control flow "
            "cannot be traced), or try --format torchscript.",
        ) from None
    return buf.getvalue()


def to_torchscript(model: nn.Module, example: torch.Tensor, name: str = "model") -> bytes:
    """The model traced to TorchScript (``torch.jit.trace``), as the bytes of ``torch.jit.save``."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, buf)
    except Exception as e:  # as above
        op = failing_operator(e)
        raise ExportError(
            f"{name} cannot be traced to TorchScript: operator {op or '(not named by the tracer)'} failed "
            f"({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})",
            hint="Replace that operator, or try --format onnx.",
        ) from None
    return buf.getvalue()


class Runner:
    """Runs an exported model on a float32 batch: onnxruntime for ONNX, torch.jit for TorchScript."""

    def __init__(self, fmt: str, data: bytes, threads: int):
        self.fmt = fmt
        if fmt == "onnx":
            ort = _need_onnx()
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors come back as exceptions, not as lines on stderr
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
        else:
            self.module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.fmt == "onnx":
            return self.session.run(None, {self.input: x.numpy()})[0]
        with torch.no_grad():
            return self.module(x).numpy()


def export_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    fmt: str = "onnx",
    *,
    name: str = "model",
    check_batch: int = 64,
    latency_batch: int = 128,
    latency_runs: int = 20,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> tuple[bytes, dict[str, Any]]:
    """Export ``model`` (inputs ``[batch, *input_shape]``), check it against PyTorch, time it.

    Returns the file's bytes and its record; raises ``ExportError`` when the export fails or its
    outputs differ from PyTorch's by more than ``tolerance``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *input_shape, generator=gen)  # traced at batch 2, checked at check_batch
    t0 = time.perf_counter()
    data = (to_onnx if fmt == "onnx" else to_torchscript)(model, example, name)
    export_seconds = time.perf_counter() - t0
    threads = torch.get_num_threads()
    run = Runner(fmt, data, threads)
    x = torch.randn(check_batch, *input_shape, generator=gen)
    with torch.no_grad():
        expected = model(x).numpy()
    try:
        got = run(x)
    except Exception as e:  # onnxruntime's and TorchScript's errors: the export holds a traced constant
        raise ExportError(
            f"the exported {name} fails on a batch of {check_batch} (traced at 2): {str(e).strip()[:300]}",
            hint="The model reads a size as a Python number (len(x), x.size(0) in arithmetic); use "
            "tensor shapes (x.shape[0], flatten) so the batch axis stays dynamic.",
        ) from None
    if got.shape != expected.shape:
        raise ExportError(f"the exported {name} returns shape {got.shape}, PyTorch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if not diff <= tolerance:
        raise ExportError(
            f"the exported {name} does not match PyTorch: max abs difference {diff:.3g} > {tolerance:g}",
            hint="Nothing was written. Report the model and the exporter versions; --format torchscript may match.",
        )
    xl = torch.randn(latency_batch, *input_shape, generator=gen)
    with torch.no_grad():
        torch_ms = _median_ms(lambda: model(xl), latency_runs)
    exported_ms = _median_ms(lambda: run(xl), latency_runs)
    record = {
        "format": fmt,
        "bytes": len(data),
        "sha256": sha256(data),
        "input": {"name": "input", "shape": ["batch", *input_shape], "dtype": "float32", "normalised": True},
        "output": {"name": "logits", "shape": ["batch", "classes"]},
        "opset": OPSET if fmt == "onnx" else None,
        "check": {
            "inputs": f"seeded N(0, 1), batch {check_batch} (traced at batch 2)",
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "argmax_agreement": agreement,
            "runtime": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else "torch.jit.load",
        },
        "latency": {
            "batch": latency_batch,
            "runs": latency_runs,
            "threads": threads,
            "exported_ms": exported_ms,
            "torch_ms": torch_ms,
        },
        "export_seconds": round(export_seconds, 3),
        "versions": _versions(),
    }
    return data, record


def input_shape_of(art: Artifact) -> tuple[int, int, int]:
    kwargs = art.manifest["model"]["kwargs"]
    return int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"])


def read_exports(art: Artifact) -> dict[str, Any]:
    home = art.home or art.store
    if not home.exists(EXPORTS):
        return {"exports": {}}
    try:
        doc = json.loads(home.read_bytes(EXPORTS))
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("exports"), dict):
        raise ExportError(
            f"{home.uri(EXPORTS)} is not a valid exports record",
            hint="Delete it and export again.",
        )
    return doc


def export_artifact(uri: str, fmt: str = "onnx", **options: Any) -> dict[str, Any]:
    """Export the model of the artifact at ``uri``; write the file, then ``exports.json``; return the record."""
    art = open_artifact(uri)
    if not art.manifest.get("weights") or not art.manifest.get("model"):
        raise ExportError(
            f"{art.uri} holds no model (a {art.manifest.get('kind')} stage)",
            hint="Export a train, distill, transfer or adapt stage's artifact.",
        )
    model = art.build_model()
    name = art.manifest["model"]["name"]
    home = art.home or art.store
    weights = art.weights_sha256 or sha256(b"")
    if fmt == "hf":
        rel = f"exports/hf/{weights[:16]}"
        record = export_hf(art, model, home.child(rel), tolerance=options.get("tolerance", 1e-4))
    else:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        data, record = export_model(model, input_shape_of(art), fmt, name=name, **options)
        rel = f"exports/{fmt}/{weights[:16]}/{FILES[fmt]}"
        home.write_bytes(rel, data)  # the file first; the record that names it last
    record = {
        **record,
        "file": rel,
        "uri": home.uri(rel),
        "artifact": art.uri,
        "model": name,
        "weights_sha256": art.weights_sha256,
        "artifact_version": art.manifest.get("version"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    doc = read_exports(art)
    doc["exports"][fmt] = record
    home.write_bytes(EXPORTS, json.dumps(doc, indent=2, sort_keys=True).encode())
    return record


def preprocessor_config(art: Artifact) -> dict[str, Any] | None:
    """A ``preprocessor_config.json`` (ViTImageProcessor's fields) for the inputs the exported network reads:
    its own view if it has one, else the data's size and normalisation it was trained on; None for token ids."""
    record = art.manifest["model"]
    if record["hf"].get("task") == "sequence_classification":
        return None
    kwargs = record["kwargs"]
    view = kwargs.get("inputs") or {}
    size = view.get("crop") or view.get("size") or [kwargs["image_size"]] * 2
    channels = int(view.get("channels") or kwargs["in_channels"])
    mean, std = (view["mean"], view["std"]) if "mean" in view else data_normalisation(art)
    if mean is None:  # the network reads pixels in [0, 1]
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": dict(zip(("height", "width"), size)),
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": False,
        }
    per = [float(v) for v in (mean if isinstance(mean, list) else [mean] * channels)]
    spread = [float(v) for v in (std if isinstance(std, list) else [std] * channels)]
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": int(size[0]), "width": int(size[1])},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": per,
        "image_std": spread,
    }


def data_normalisation(art: Artifact) -> tuple[Any, Any]:
    """The mean and std the artifact's stage normalised its inputs with (read from its data spec)."""
    from kdray.contracts.specs import DataSpec
    from kdray.data import datasets as kdata

    data = (art.manifest.get("spec") or {}).get("data")
    split = kdata.load(DataSpec.model_validate(data or {}), "val")
    return (
        list(split.mean) if isinstance(split.mean, tuple) else split.mean,
        list(split.std) if isinstance(split.std, tuple) else split.std,
    )


def export_hf(
    art: Artifact, model: nn.Module, store: Any, *, tolerance: float = 1e-4, batch: int = 16
) -> dict[str, Any]:
    """Write ``model`` (a transformers network) as a Hugging Face folder in ``store``, load it back with
    ``from_pretrained`` and compare its logits with kdray's on a seeded batch; return the record."""
    from kdray.contracts.hffolder import write_folder
    from kdray.models.hf import TASKS, transformers

    record = art.manifest["model"]
    if not record.get("hf"):
        raise ExportError(
            f"--format hf: {art.uri} holds a {record.get('family', 'kdray')} model ({record['name']}), "
            "not a transformers network",
            hint="Export a stage whose model is model.hf or model.hf_config, or use --format onnx.",
        )
    t0 = time.perf_counter()
    files = write_folder(model, store, preprocessor_config(art))
    tf = transformers()
    task = record["hf"].get("task", "image_classification")
    kwargs = record["kwargs"]
    gen = torch.Generator().manual_seed(0)
    if task == "sequence_classification":
        vocab = int(getattr(model, "config").vocab_size)  # noqa: B009  (a transformers config)
        x = torch.randint(0, vocab, (batch, int(kwargs["in_channels"])), generator=gen)
    else:
        x = torch.randn(
            batch, int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"]), generator=gen
        )
    view = model.__dict__.get("kdray_input_view")
    with tempfile.TemporaryDirectory(prefix="kdray-hf-check-") as tmp:
        for name in files:
            Path(tmp, name).write_bytes(store.read_bytes(name))
        loaded = getattr(tf, TASKS[task]).from_pretrained(tmp, use_safetensors=True).eval()
    with torch.no_grad():
        expected = model.float().eval()(x)
        got = loaded(view(x) if view is not None else x).logits
    diff = float((got - expected).abs().max())
    if not diff <= tolerance:
        raise ExportError(
            f"the Hugging Face folder written for {record['name']} does not match kdray's model: "
            f"max abs difference {diff:.3g} > {tolerance:g}",
            hint="Report the model and the transformers version.",
        )
    return {
        "format": "hf",
        "bytes": sum(len(store.read_bytes(n)) for n in files),
        "files": files,
        "sha256": files.get("model.safetensors", ""),
        "task": task,
        "auto_class": TASKS[task],
        "preprocessor": "preprocessor_config.json" in files,
        "check": {
            "inputs": f"seeded, batch {batch}",
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean()),
            "runtime": f"transformers {tf.__version__} {TASKS[task]}.from_pretrained",
        },
        "export_seconds": round(time.perf_counter() - t0, 3),
        "versions": {**_versions(), "transformers": tf.__version__},
    }


def summary(record: dict[str, Any]) -> str:
    if record["format"] == "hf":
        c = record["check"]
        return (
            f"{record['model']} -> Hugging Face folder {record['uri']} ({', '.join(sorted(record['files']))}; "
            f"{record['bytes']:,} bytes): loaded back with {record['auto_class']}.from_pretrained, max abs "
            f"difference vs kdray {c['max_abs_diff']:.2e} (<= {c['tolerance']:g}), argmax agreement "
            f"{c['argmax_agreement']:.4f}"
        )
    c, lat = record["check"], record["latency"]
    return (
        f"{record['model']} -> {record['format']} {record['uri']} ({record['bytes']:,} bytes, sha256 "
        f"{record['sha256'][:12]}): max abs difference vs PyTorch {c['max_abs_diff']:.2e} (<= {c['tolerance']:g}), "
        f"argmax agreement {c['argmax_agreement']:.4f}; latency at batch {lat['batch']}: "
        f"{lat['exported_ms']:.2f} ms exported, {lat['torch_ms']:.2f} ms PyTorch ({lat['threads']} threads)"
    )
