"""Every error message kdray can raise, proofread: no "..", sentences that end, stage names beside
indices, the `kdray schema` tail only under a field's name or type, "1 stage" and "an evaluate stage".

Two catalogues: the text of every ``raise KdrayError/SpecError/...(...)`` in the source (read with
``ast``, an expression shown as ``{}``), and the whole paragraphs of errors that bad input really
raises (a spec, an override, a command's argument), checked as the user reads them.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
from helpers import REPO, synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.core.errors import KdrayError
from kdray.engine.spec import load_pipeline, parse_pipeline

SOURCE = REPO / "kdray"
ERRORS = {"KdrayError", "SpecError", "DataError", "StorageError", "CheckpointMismatch", "_bad"}

DOUBLE_PERIOD = re.compile(r"(?<![.\s/\d{}(~])\.\.(?![./\d{}])")  # not '...', '../x', '0..9', '{}..{}'
WRONG_PLURAL = re.compile(r"(?<![\d,.])\b1 (stages|classes|files|rows|epochs|workers|models)\b")
A_BEFORE_VOWEL = "evaluate|adapt|export|import|onnx|artifact|integer|error|image|array|override|option|index|entry|empty|existing|absolute|other|object|epoch"
WRONG_ARTICLE = re.compile(rf"\ba ({A_BEFORE_VOWEL})\b|\ban? \{{[^}}]*kind[^}}]*\}}", re.I)
BARE_INDEX = re.compile(r"stages\[\d+\](?! \()")


def template(node: ast.AST) -> str | None:
    """The literal text of a message expression, ``{}`` for what is computed; None when none is literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        return None if left is None and right is None else (left or "{}") + (right or "{}")
    return None


def raised_messages() -> list[tuple[str, str, str]]:
    """(where, which part, text) of every message and hint passed to a kdray error in the source."""
    out = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ERRORS):
                continue
            where = f"{path.relative_to(SOURCE.parent)}:{node.lineno}"
            parts = [("message", node.args[0])] if node.args else []
            parts += [(k.arg, k.value) for k in node.keywords if k.arg in ("message", "hint")]
            out += [(where, part, text) for part, value in parts if (text := template(value)) is not None]
    return out


CATALOGUE = raised_messages()


def test_the_catalogue_is_read():
    assert len(CATALOGUE) > 200, "every raise site of the package"


@pytest.mark.parametrize("check", ["double period", "plural", "article", "hint is a sentence"])
def test_every_raised_text(check):
    bad = []
    for where, part, text in CATALOGUE:
        if check == "double period" and DOUBLE_PERIOD.search(text):
            bad.append((where, text))
        elif check == "plural" and WRONG_PLURAL.search(text):
            bad.append((where, text))
        elif check == "article" and WRONG_ARTICLE.search(text):
            bad.append((where, text))
        elif check == "hint is a sentence" and part == "hint" and not re.match(r"[A-Z`{'\"(]", text.lstrip()):
            bad.append((where, text))
    assert not bad, "\n".join(f"{w}: {t}" for w, t in bad)


# --------------------------------------------------------------------------- what users really read


def base(tmp_path: Path) -> dict:
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1)
    doc["stages"] += [
        {
            "name": "student",
            "kind": "distill",
            "teacher": "teacher",
            "model": {"name": "mlp_32"},
            "data": doc["stages"][0]["data"],
        },
        {"name": "eval", "kind": "evaluate", "models": ["teacher", "student"]},
    ]
    return doc


# (override, what the paragraph must say) on the base pipeline
BAD_OVERRIDES = [
    (["stages.student.optim.epochs=x"], "valid integer"),
    (["stages.student.optim.epochz=3"], "did you mean 'epochs'"),
    (["stages.student.model.name=resnet18"], "import"),
    (["stages.eval.models=[nosuch]"], "no stage named 'nosuch'"),
    (["stages.student.teacher=eval"], "teacher"),
    (["stages.student.kind=distil"], "unknown stage kind"),
    (["name=Bad_Name"], "DNS-safe"),
    (["stages.teacher.name=student"], "used twice"),
    (["stages.student.losses=[{name: hinton_kl, temperature: -1}]"], "temperature"),
    (["stages.teacher.data.classes=[3]"], "classes"),
    (["nosuch"], "key.path=value"),
    (["stages.9.name=x"], "no list item"),
]


def proofread(text: str, *, schema_tail: bool | None = None) -> None:
    assert not DOUBLE_PERIOD.search(text), text
    assert text.rstrip().endswith((".", "?", "!")), f"ends as a sentence: {text}"
    assert not WRONG_PLURAL.search(text) and not WRONG_ARTICLE.search(text), text
    assert not BARE_INDEX.search(text), f"a stage's index without its name: {text}"
    assert "\n" not in text.strip(), "one paragraph"
    assert not re.search(r"<\w+(\.\w+)* object at 0x", text), "no Python object reprs"
    if schema_tail is not None:
        assert ("kdray schema" in text) == schema_tail, text


@pytest.mark.parametrize("overrides,says", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_spec_errors_read_well(tmp_path, overrides, says):
    with pytest.raises(KdrayError) as err:
        parse_pipeline(copy.deepcopy(base(tmp_path)), "spec.yaml", overrides)
    text = str(err.value)
    assert says in text, text
    names_a_field = any(w in says for w in ("integer", "did you mean 'epochs'"))
    proofread(
        text, schema_tail=True if names_a_field else (False if "=" in overrides[0] and "kind" not in says else None)
    )
    if "=" in overrides[0] and says not in ("no list item", "used twice"):
        assert "set by the override" in text, "a field set on the command line is not blamed on the file"


def test_a_stage_index_comes_with_its_name(tmp_path):
    doc = base(tmp_path)
    doc["stages"][1]["optim"] = {"lr": -1}
    with pytest.raises(KdrayError) as err:
        parse_pipeline(doc, "spec.yaml")
    assert "stages[1] (student).optim.lr" in str(err.value)
    proofread(str(err.value), schema_tail=True)
    assert "set by the override" not in str(err.value), "a field of the file is the file's"


COMMANDS = [
    (["ls", "./missing"], "no folder"),
    (["ls", "modles"], "did you mean 'models'"),
    (["validate", "nosuch.yaml"], "does not exist"),
    (["show", "./missing"], "missing"),
    (["inspect", "SPEC", "--stage", "eval"], "an evaluate stage"),
    (["score", "SPEC", "--stage", "eval"], "an evaluate stage"),
    (["sweep", "SPEC"], "needs --stage"),
    (["plan", "SPEC", "stages.nosuch.optim.epochs=1"], "no list item"),
]


@pytest.mark.parametrize("args,says", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_command_errors_read_well(tmp_path, monkeypatch, args, says):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base(tmp_path)))
    result = CliRunner().invoke(app, [a.replace("SPEC", "spec.yaml") for a in args])
    assert result.exit_code == 2, result.output
    text = result.output.removeprefix("error: ")
    assert says in text, text
    proofread(text)


def test_the_spec_file_loads(tmp_path):
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base(tmp_path)))
    assert [s.name for s in load_pipeline(tmp_path / "spec.yaml").stages] == ["teacher", "student", "eval"]
