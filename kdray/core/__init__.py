"""What every part of kdray stands on: errors, registries and parameters, specs' building blocks,
storage and artifacts, data, models, the ``Method`` contract and the ``StageKind`` plug-in."""
