"""The training system: one FSDP2 loop for every stage (:mod:`.loop`), the per-stage losses
(:mod:`.objectives`), checkpoints, distributed helpers, the learning-rate schedule and metrics."""
