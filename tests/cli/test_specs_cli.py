"""Specs and the CLI: bad input is one paragraph naming file and field, exit code 2, no traceback."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from kdray.cli import app
from kdray.engine.spec import load_pipeline

runner = CliRunner()

GOOD = """
name: fmnist-demo
storage: {uri: file://RUNS}
run: {workers: 0}
stages:
  - name: teacher
    kind: train
    model: {name: cnn_small}
    data: {name: synthetic}
    optim: {epochs: 1, lr: 0.001}
  - name: student
    kind: distill
    teacher: teacher
    model: {name: mlp_64}
    data: {name: synthetic}
    losses:
      - {name: cross_entropy, weight: 0.1}
      - {name: hinton_kl, weight: 0.9, temperature: 4}
  - name: eval
    kind: evaluate
    models: [teacher, student]
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("RUNS", str(tmp_path / "runs")))
    return path


def edit(mutate):
    doc = yaml.safe_load(GOOD)
    mutate(doc)
    return yaml.safe_dump(doc)


BAD = {
    "yaml syntax": ("name: x\nstages: [\n  - {name: a", ["YAML syntax error at line"]),
    "not a mapping": ("- just\n- a list\n", ["a pipeline spec is a YAML mapping"]),
    "unknown top field": (edit(lambda d: d.update(colour="red")), ["colour: unknown field"]),
    "unknown stage field": (
        edit(lambda d: d["stages"][0].update(epochs=3)),
        ["stages[0] (teacher).epochs: unknown field"],
    ),
    "wrong type": (edit(lambda d: d["stages"][0]["optim"].update(lr="fast")), ["stages[0] (teacher).optim.lr", "fast"]),
    "out of range": (
        edit(lambda d: d["stages"][0]["optim"].update(lr=-1)),
        ["stages[0] (teacher).optim.lr", "greater than 0"],
    ),
    "unknown model": (
        edit(lambda d: d["stages"][0]["model"].update(name="cnn_smal")),
        ["stages[0] (teacher).model.name", "did you mean 'cnn_small'"],
    ),
    "unknown model option": (
        edit(lambda d: d["stages"][0]["model"].update(widht=4)),
        ["stages[0] (teacher).model", "has no parameter 'widht'"],
    ),
    "unknown dataset": (
        edit(lambda d: d["stages"][0]["data"].update(name="fashion_mnsit")),
        ["stages[0] (teacher).data.name", "did you mean 'fashion_mnist'"],
    ),
    "unknown loss": (
        edit(lambda d: d["stages"][1]["losses"][1].update(name="hinton")),
        ["stages[1] (student).losses[1].name", "hinton_kl"],
    ),
    "bad loss option": (
        edit(lambda d: d["stages"][1]["losses"][1].update(temperature=0)),
        ["stages[1] (student).losses[1]", "temperature"],
    ),
    "misspelt loss option": (
        edit(lambda d: d["stages"][1]["losses"][1].update(temprature=2)),
        ["stages[1] (student).losses[1]", "temprature", "temperature"],
    ),
    "unknown stage kind": (
        edit(lambda d: d["stages"][0].update(kind="pretrain")),
        ["stages[0] (teacher).kind", "unknown stage kind 'pretrain'"],
    ),
    "missing kind": (edit(lambda d: d["stages"][0].pop("kind")), ["stages[0]", "needs a 'kind'"]),
    "unknown teacher": (
        edit(lambda d: d["stages"][1].update(teacher="teachr")),
        ["stages[1] (student).teacher", "no stage named 'teachr'", "did you mean 'teacher'"],
    ),
    "forward reference": (
        edit(lambda d: d["stages"].insert(0, d["stages"].pop(1))),
        ["stages[0] (student).teacher", "comes after"],
    ),
    "self reference": (edit(lambda d: d["stages"][1].update(teacher="student")), ["refers to itself"]),
    "duplicate stage": (edit(lambda d: d["stages"][2].update(name="student")), ["used twice"]),
    "not dns safe": (edit(lambda d: d.update(name="My_Pipeline")), ["pipeline name 'My_Pipeline' must be DNS-safe"]),
    "missing field": (
        edit(lambda d: d["stages"][0].pop("model")),
        ["stages[0] (teacher).model: required field is missing"],
    ),
    "credentials in spec": (
        edit(lambda d: d.update(storage={"uri": "s3://b/p?secret_key=abc"})),
        ["credentials do not belong in the spec"],
    ),
    "bad storage scheme": (edit(lambda d: d.update(storage={"uri": "gs://bucket"})), ["scheme 'gs' is not supported"]),
    "empty stages": (edit(lambda d: d.update(stages=[])), ["stages", "at least 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_is_one_paragraph_with_exit_2(tmp_path, case):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    result = runner.invoke(app, ["validate", str(path)])
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert str(path) in out, "the message names the file"
    for piece in expected:
        assert piece in out, f"{piece!r} not in {out!r}"


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_missing_data_folder_at_run_time(tmp_path):
    doc = yaml.safe_load(GOOD)
    doc["stages"] = [doc["stages"][0]]
    doc["stages"][0]["data"] = {"name": "fashion_mnist", "path": str(tmp_path / "no-data")}
    path = write(tmp_path, yaml.safe_dump(doc))
    result = runner.invoke(app, ["run", str(path)])  # refused before any stage starts
    assert result.exit_code == 2, result.output
    assert "stages.teacher.data.path: no folder or file at" in result.output and "Traceback" not in result.output
    (tmp_path / "no-data").mkdir()  # there, but without the files: told by the stage that reads it
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "no train-images-idx3-ubyte" in result.output and "Traceback" not in result.output


def test_bad_override(tmp_path):
    path = write(tmp_path, GOOD)
    result = runner.invoke(app, ["validate", str(path), "stages.nosuch.optim.lr=1"])
    assert result.exit_code == 2 and "no list item 'nosuch'" in result.output
    result = runner.invoke(app, ["validate", str(path), "stages.teacher.optim.lr=-3"])
    assert result.exit_code == 2 and "stages[0] (teacher).optim.lr" in result.output


def test_good_spec_and_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "OK" in result.output
    spec = load_pipeline(path, ["stages.teacher.optim.epochs=7", "run.workers=2", "stages.1.model.name=mlp_128"])
    assert spec.stages[0].optim.epochs == 7 and spec.run.workers == 2 and spec.stages[1].model.name == "mlp_128"
    assert spec.run_for(spec.stages[0]).workers == 2


def test_stage_run_overrides_pipeline_run(tmp_path):
    doc = yaml.safe_load(GOOD)
    doc["stages"][0]["run"] = {"use_gpu": True}
    spec = load_pipeline(write(tmp_path, yaml.safe_dump(doc)))
    run = spec.run_for(spec.stages[0])
    assert run.use_gpu is True and run.workers == 0  # the stage's field on top of the pipeline's


def test_schema_is_json_schema():
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert result.exit_code == 0 and schema["title"] == "PipelineSpec"
    assert {"train", "distill", "evaluate"} <= set(json.dumps(schema).split('"')) or "distill" in result.output


@pytest.mark.parametrize("what", ["models", "datasets", "losses", "stages"])
def test_ls_registries(what):
    result = runner.invoke(app, ["ls", what])
    assert result.exit_code == 0 and result.output.strip()


def test_ls_unknown_registry():
    result = runner.invoke(app, ["ls", "modles"])
    assert result.exit_code == 2 and "did you mean 'models'" in result.output
