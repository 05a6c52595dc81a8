"""Causal language models: text import, token-level losses, the top-k sequence cache, stages and evaluation.

The corpus is real: a few modules of the standard library this Python runs on (found through
``sysconfig`` at run time), split by module into training, validation and test documents.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError, KdrayError
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.data.text import PAD, dataset_tokenizer, import_text
from kdray.distill.losses import build_loss
from kdray.distill.seqcache import decode, encode, read_topk_rows
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import lm
from kdray.models.hooks import Outputs

MODULES = ("textwrap", "string", "shlex", "glob", "fnmatch", "bisect", "heapq", "colorsys", "copy", "calendar")
SEQ = 32


def corpus(folder: Path, modules=MODULES) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in modules:
        shutil.copy(root / f"{name}.py", folder / f"{name}.py")
    return folder


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> str:
    """A BPE of 384 ids trained on the training modules, rows of 32 tokens."""
    tmp = tmp_path_factory.mktemp("lm")
    dest = str(tmp / "data")
    import_text(str(corpus(tmp / "corpus")), dest, vocab_size=384, seq_len=SEQ, test_fraction=0.2, log=lambda m: None)
    return dest


# --------------------------------------------------------------------------- import


def test_text_import_holds_out_documents_and_records_the_tokenizer(text_data):
    meta = json.loads(Path(text_data, "dataset.json").read_text())
    text = meta["text"]
    docs = text["documents"]
    assert len(docs["test"]) == 2 and len(docs["val"]) == 1 and len(docs["train"]) == 7
    assert not set(docs["train"]) & set(docs["test"]) and not set(docs["val"]) & set(docs["train"] + docs["test"])
    tok_bytes = Path(text_data, "tokenizer.json").read_bytes()
    assert text["tokenizer"]["sha256"] == hashlib.sha256(tok_bytes).hexdigest()
    assert meta["num_classes"] == text["tokenizer"]["vocab_size"] == 384 and meta["shape"] == [SEQ]
    spec = DataSpec(name="parquet", path=text_data)
    train, val, test = (kdata.load(spec, part) for part in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (text["rows"]["train"], text["rows"]["val"], text["rows"]["test"])
    assert meta["splits"]["train"]["held_out_from"] == len(train)
    # packed: every row full but a part's last; its padding only at the end; each document ends with EOS
    for part in (train, val, test):
        pads = (part.x == PAD).sum(1)
        assert int(pads[:-1].sum()) == 0 and bool((part.x[-1, SEQ - int(pads[-1]) :] == PAD).all())
    eos = text["tokenizer"]["eos_id"]
    assert int((train.x == eos).sum()) == len(docs["train"])
    # the tokens are the documents: the held-out test rows decode to the test modules' text
    tokenizer = dataset_tokenizer(Storage(text_data), meta)
    test_text = tokenizer.decode(test.x.flatten().tolist())
    first = Path(sysconfig.get_paths()["stdlib"], docs["test"][0]).read_text()
    assert test_text.startswith(first)
    assert (
        sum(len(tokenizer.encode(Path(sysconfig.get_paths()["stdlib"], d).read_text())) for d in docs["test"])
        == (text["tokens"]["test"])
    )


def test_bytes_jsonl_and_a_given_tokenizer_json(tmp_path, text_data):
    lines = [json.dumps({"text": f"def f{i}():\n    return {i} * 2\n"}) for i in range(6)]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    meta = import_text(str(src), str(tmp_path / "b"), tokenizer="bytes", seq_len=16, log=lambda m: None)
    assert meta["num_classes"] == 257 and meta["text"]["tokenizer"]["kind"] == "bytes"
    x = kdata.load(DataSpec(name="parquet", path=str(tmp_path / "b")), "test").x
    assert bytes(int(i) for i in x.flatten() if 0 <= i < 256).decode().startswith("def f")
    # the BPE written by the first import, read back from its folder: the same tokenizer (same sha256)
    again = import_text(str(corpus(tmp_path / "c", MODULES[:4])), str(tmp_path / "t"), tokenizer=text_data, log=print)
    first = json.loads(Path(text_data, "dataset.json").read_text())
    assert again["text"]["tokenizer"]["sha256"] == first["text"]["tokenizer"]["sha256"]


def test_text_import_errors_name_the_fix(tmp_path):
    corpus(tmp_path / "two", MODULES[:2])
    result = CliRunner().invoke(app, ["data", "import", str(tmp_path / "two"), str(tmp_path / "out"), "--as", "text"])
    assert result.exit_code == 2 and "needs at least 3" in result.output and "Traceback" not in result.output
    with pytest.raises(DataError, match="no tokenizer.json"):
        import_text(str(corpus(tmp_path / "c")), str(tmp_path / "o"), tokenizer=str(tmp_path), log=lambda m: None)


# --------------------------------------------------------------------------- losses


def seq_outputs(seed=0, n=3, t=6, v=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, v, (n, t), generator=g)
    x[1, 4:] = PAD  # a padded row
    s = torch.randn(n, t, v, generator=g, requires_grad=True)
    te = torch.randn(n, t, v, generator=g)
    return x, s, te


@pytest.mark.parametrize("name", ["token_kl", "token_reverse_kl", "token_jsd"])
def test_token_losses_zero_on_equal_positive_otherwise_and_masked(name):
    x, s, t = seq_outputs()
    loss = build_loss(name)
    assert float(loss(Outputs(t.clone()), Outputs(t), {"x": x})) == pytest.approx(0.0, abs=1e-6)
    value = loss(Outputs(s), Outputs(t), {"x": x})
    assert float(value.detach()) > 0
    value.backward()
    assert s.grad is not None and float(s.grad[1, 3:].abs().sum()) == 0.0  # positions without a real next token
    assert float(s.grad[:, -1].abs().sum()) == 0.0  # the last position has no next token
    changed = s.detach().clone()
    changed[1, 3:] += 100.0
    assert float(loss(Outputs(changed), Outputs(t), {"x": x})) == pytest.approx(float(value), rel=1e-6)


def test_token_kl_is_hinton_per_token_and_top_k_with_tail_is_exact_at_full_k():
    x, s, t = seq_outputs()
    mask = lm.token_mask(x)
    steps = mask.shape[1]
    T = 2.0
    manual = (
        F.kl_div(
            F.log_softmax(s[:, :steps][mask] / T, -1),
            F.log_softmax(t[:, :steps][mask] / T, -1),
            reduction="batchmean",
            log_target=True,
        )
        * T
        * T
    )
    assert float(build_loss("token_kl", temperature=T)(Outputs(s), Outputs(t), {"x": x})) == pytest.approx(
        float(manual), rel=1e-5
    )
    full = float(build_loss("token_kl")(Outputs(s), Outputs(t), {"x": x}))
    assert float(build_loss("token_kl", top_k=11)(Outputs(s), Outputs(t), {"x": x})) == pytest.approx(full, rel=1e-4)
    # a cached teacher (ids + log-probs) gives what cutting the full logits to the same k gives
    values, ids = F.log_softmax(t[:, :-1], -1).topk(4, -1)
    cached = build_loss("token_kl")(Outputs(s), Outputs(values, topk_ids=ids), {"x": x})
    online = build_loss("token_kl", top_k=4)(Outputs(s), Outputs(t), {"x": x})
    assert float(cached) == pytest.approx(float(online), rel=1e-5)
    renormalised = build_loss("token_kl", top_k=4, tail=False)(Outputs(s), Outputs(t), {"x": x})
    assert float(renormalised) != pytest.approx(float(online), rel=1e-3)


def test_jsd_is_symmetric_at_half_and_between_the_kls():
    x, s, t = seq_outputs(seed=3)
    a = float(build_loss("token_jsd", beta=0.5)(Outputs(s), Outputs(t), {"x": x}))
    b = float(build_loss("token_jsd", beta=0.5)(Outputs(t.clone().requires_grad_()), Outputs(s.detach()), {"x": x}))
    assert a == pytest.approx(b, rel=1e-5) and 0 < a < 0.7  # JSD is at most log 2


def test_cross_entropy_and_weighted_mse_apply_per_token():
    x, s, t = seq_outputs(seed=5)
    ce = build_loss("cross_entropy")(Outputs(s), None, {"x": x, "y": torch.zeros(len(x), dtype=torch.long)})
    assert float(ce) == pytest.approx(float(lm.next_token_nll(s, x)))
    mse = build_loss("weighted_output_mse")(Outputs(s), Outputs(t), {"x": x})
    mask = lm.token_mask(x)
    manual = (s[:, :-1][mask] - t[:, :-1][mask]).pow(2).sum(-1).mean()
    assert float(mse) == pytest.approx(float(manual), rel=1e-5)
    values, ids = t[:, :-1].topk(3, -1)
    with pytest.raises(KdrayError, match="teacher_cache: off"):
        build_loss("weighted_output_mse")(Outputs(s), Outputs(values, topk_ids=ids), {"x": x})


@pytest.mark.parametrize("quantize,tol", [("none", 0.0), ("fp16", 2e-3), ("int8", 0.05)])
def test_cache_encoding_round_trips(quantize, tol):
    g = torch.Generator().manual_seed(0)
    values, ids = F.log_softmax(torch.randn(5, 7, 300, generator=g) * 3, -1).topk(16, -1)
    chunk = encode(torch.cat([ids.float(), values], -1), 300, quantize)
    assert chunk["ids"].dtype == torch.int16
    got_ids, got = decode(chunk)
    assert torch.equal(got_ids.long(), ids)
    assert float((got - values).abs().max()) <= tol + 1e-7


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One storage root for the stage tests: the teacher trains once, the second test finds it cached."""
    return tmp_path_factory.mktemp("runs")


def lm_pipeline(runs, data, *stages, workers=0):
    teacher = {
        "name": "teacher",
        "kind": "train",
        "model": {"name": "lm_tiny", "dim": 64, "depth": 2},
        "data": {"name": "parquet", "path": data},
        "optim": {"epochs": 2, "batch_size": 16, "lr": 3e-3},
    }
    return {
        "name": "lm",
        "storage": {"uri": f"file://{runs}"},
        "run": {"workers": workers},
        "stages": [teacher, *stages],
    }


def student(name, model=None, losses=None, data=None, **kw):
    return {
        "name": name,
        "kind": "distill",
        "teacher": "teacher",
        "model": model or {"name": "lm_tiny", "dim": 32, "depth": 1},
        "data": data,
        "optim": {"epochs": 1, "batch_size": 16, "lr": 3e-3},
        "losses": losses or [{"name": "token_kl", "weight": 1.0}],
        **kw,
    }


def test_teacher_topk_cache_students_hf_models_and_the_report(runs, text_data):
    data = {"name": "parquet", "path": text_data}
    gpt2 = {
        "hf_config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": SEQ},
        "task": "causal_lm",
    }
    llama = {
        "hf_config": {
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": SEQ,
        },
        "task": "causal_lm",
    }
    doc = lm_pipeline(
        runs,
        text_data,
        student("kd", data=data, teacher_topk={"k": 16, "quantize": "int8"}),
        student(
            "kd-llama",
            model=llama,
            data=data,
            teacher_topk={"k": 16, "quantize": "int8"},
            losses=[{"name": "cross_entropy", "weight": 0.5}, {"name": "token_jsd", "weight": 0.5}],
        ),
        {"name": "gpt", "kind": "train", "model": gpt2, "data": data, "optim": {"epochs": 1, "batch_size": 16}},
        {"name": "report", "kind": "evaluate", "models": ["teacher", "kd", "kd-llama", "gpt"], "latency_batches": 2},
    )
    logs: list[str] = []
    out = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=logs.append, max_concurrent=1)}
    kd, llama_kd = (open_artifact(out[s].uri).manifest for s in ("kd", "kd-llama"))
    # one cache for both students (same teacher, data, k and quantisation): built once, then a hit
    assert kd["teacher"]["cache"] == llama_kd["teacher"]["cache"]
    assert sum("building teacher top-k cache" in m for m in logs) == 1 and any("top-k cache hit" in m for m in logs)
    assert kd["teacher"]["cache_topk"]["bytes_per_token"] == 16 * 3 + 4
    assert llama_kd["model"]["hf"]["task"] == "causal_lm"
    for m in (kd, llama_kd):  # learned: well below the uniform guess's log(384) = 5.95 nats a token
        assert m["metrics"]["val_loss"] < math.log(384) - 0.5 and m["metrics"]["train_acc"] is None
    report = open_artifact(out["report"].uri).read_json("report.json")
    rows = {r["stage"]: r for r in report["models"]}
    for r in rows.values():  # the uniform guess has perplexity 384
        assert 1 < r["perplexity"] < 384 / 2 and r["tokens_per_s"] > 0 and isinstance(r["sample"], str) and r["sample"]
    assert rows["teacher"]["perplexity"] < min(rows[s]["perplexity"] for s in ("kd", "kd-llama", "gpt"))
    assert rows["kd"]["teacher"] == "teacher" and 0 <= rows["kd"]["agreement"] <= 1
    assert "## Samples" in open_artifact(out["report"].uri).read_bytes("report.md").decode()
    # a corrupt chunk is refused, naming the file
    cache = Storage(kd["teacher"]["cache"])
    name = next(n for n in cache.list("") if n.startswith("logits-"))
    cache.write_bytes(name, cache.read_bytes(name)[:-8] + b"xxxxxxxx")
    meta = json.loads(cache.read_bytes("meta.json"))
    with pytest.raises(KdrayError, match="is corrupt"):
        read_topk_rows(cache, 0, 4, expect_rows=meta["rows"], expect_fingerprint=meta["data_fingerprint"])


def test_streamed_cache_by_ray_data_and_a_ray_train_student(runs, text_data, ray_local):
    streamed = {"name": "parquet", "path": text_data, "stream": True}
    doc = lm_pipeline(
        runs,
        text_data,
        student("kd", data=streamed, teacher_topk={"k": 8, "quantize": "fp16"}, run={"workers": 1}),
    )
    logs: list[str] = []
    out = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=logs.append, max_concurrent=1)}
    assert out["teacher"].status == "cached"  # trained by the test before
    manifest = open_artifact(out["kd"].uri).manifest
    assert "Ray Data batch inference" in manifest["teacher"]["cache_reason"]
    assert manifest["teacher"]["cache_topk"] == {**manifest["teacher"]["cache_topk"], "k": 8, "bytes_per_token": 32}
    assert manifest["metrics"]["val_loss"] < math.log(384) - 0.5
    # the streamed cache holds every training-shard row (validation documents included), in row order
    meta = json.loads(Storage(manifest["teacher"]["cache"]).read_bytes("meta.json"))
    assert meta["rows"] == json.loads(Path(text_data, "dataset.json").read_text())["splits"]["train"]["rows"]


def test_a_causal_lm_folder_loads_its_weights_reads_padding_and_must_fit_the_rows(tmp_path):
    import transformers

    from kdray.contracts.specs import ModelSpec
    from kdray.contracts.usermodels import build_model

    config = transformers.GPT2Config(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=SEQ)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(config).eval()
    original.save_pretrained(tmp_path / "gpt2")  # config.json (architectures: GPT2LMHeadModel) + safetensors
    kwargs = {"num_classes": 300, "in_channels": SEQ, "image_size": 1}
    model = build_model(ModelSpec(hf=str(tmp_path / "gpt2")), kwargs).eval()  # no task: the architecture says
    x = torch.randint(0, 300, (2, SEQ))
    x[1, 20:] = PAD
    with torch.no_grad():
        got = model(x)
        want = original(x.clamp(min=0)).logits
    assert torch.allclose(got, want, atol=1e-5)  # its own weights; padding read as id 0
    with pytest.raises(KdrayError, match="at most 32 positions but the data's rows hold 64"):
        build_model(ModelSpec(hf=str(tmp_path / "gpt2")), {**kwargs, "in_channels": 64})
    with pytest.raises(KdrayError, match="vocabulary has 300 ids but the data's tokenizer 512"):
        build_model(ModelSpec(hf=str(tmp_path / "gpt2")), {**kwargs, "num_classes": 512})
