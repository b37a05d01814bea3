"""The frozen CLIP backbone, CoOp prompts and the gating network."""
