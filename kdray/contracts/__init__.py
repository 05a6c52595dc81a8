"""What every stage kind plugs into: specs' building blocks, the stage-kind and method contracts, checkpoints and model loading."""
