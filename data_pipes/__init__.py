"""Data: ImageNet-layout folders -> WebDataset shard sets -> exact, resumable, augmented batches.

- `data_pipes.shards`: writing and reading shard sets (`python -m data_pipes.shards.make`), their `_info.json`,
  reading runs of samples from the middle of a tar, and the generated demo data.
- `data_pipes.image`: bytes -> RGB arrays (decoding fused with the crop geometry) and the augmentation recipes.
- `data_pipes.stream`: which samples each rank and loader worker reads in which order (`plan`), the loaders that
  deliver them as batches (`loader`), the bad-sample monitor (`health`) and the Lightning datamodule.
"""
