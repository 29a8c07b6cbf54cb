"""Batches: the epoch plan (`plan`, pure functions), the loaders that follow it (`loader`), the bad-sample
monitor (`health`) and the Lightning datamodule that checkpoints the position (`datamodule`)."""
