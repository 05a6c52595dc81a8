"""Make the Hugging Face teacher folder that examples/fmnist_hf_teacher_to_mlp.yaml distils.

    python examples/make_hf_teacher.py ./hf/vit-fmnist            # or s3://<bucket>/models/vit-fmnist
    python examples/make_hf_teacher.py ./hf/vit-fmnist stages.vit.optim.epochs=2   # overrides, as kdray run takes

Runs examples/fmnist_hf_vit_teacher.yaml (a transformers ViT trained on Fashion-MNIST through kdray; a
rerun reuses the trained artifact), exports the trained network as a Hugging Face folder (what
``kdray export ARTIFACT --format hf`` does: config.json, model.safetensors and preprocessor_config.json,
checked by loading it back with ``from_pretrained``) and copies that folder to DEST, a path, file:// or
s3:// URI. Any transformers model written with ``save_pretrained`` can stand in its place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kdray.core.storage import Storage
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import load_pipeline
from kdray.evaluate.export import export_artifact, summary

SPEC = Path(__file__).with_name("fmnist_hf_vit_teacher.yaml")


def main(dest: str, overrides: list[str] | None = None, log=print) -> dict:
    """Train the ViT (reused if already trained), export it as a Hugging Face folder, copy it to ``dest``."""
    outcomes = {o.stage: o for o in run_pipeline(load_pipeline(SPEC, overrides=overrides or []), log=log)}
    record = export_artifact(outcomes["vit"].uri, "hf")
    log(summary(record))
    source, target = Storage(record["uri"]), Storage(dest)
    for name in sorted(record["files"], key=lambda n: n == "config.json"):  # config.json last
        target.write_bytes(name, source.read_bytes(name))
    log(f"Hugging Face folder: {target.uri()} ({', '.join(sorted(record['files']))})")
    return record


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
