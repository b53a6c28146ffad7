"""Training: the LightningModule, schedules, result records and the run driver."""
