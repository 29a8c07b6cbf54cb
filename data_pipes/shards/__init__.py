"""Shard sets: written once by `python -m data_pipes.shards.make` (scan -> plan -> write, resumable), described
by `_info.json` (`metadata`), read sample runs at a time (`read`)."""
