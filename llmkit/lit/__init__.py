"""Lightning glue: the LightningModule, optimizers and schedules, callbacks."""
