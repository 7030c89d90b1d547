"""The training system: the LightningModule, its callbacks, checkpoints, loggers and resuming."""
