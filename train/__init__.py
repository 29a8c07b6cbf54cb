"""Training: `python -m train` and the parts it assembles, each layer building only on those below it.

    nets       the model layer: timm networks by name, sizes, MACs, the normaliser, the one loader of trained networks
    quant      quantization-aware training and int8 exports (`qat=true`)
    export     shipping a network: safetensors + timm config + ONNX + metrics (`python -m train.export`)
    features   optional features as components (`distill`, `qat`) that contribute their parts to a run
    builders   each part of a run built from the composed config; `run`: `train(cfg)`, the flat assembly
    module     the LightningModule; `objective`: what the step minimises; `optim`: timm optimizer and schedule
    callbacks  checkpoints, RNG state, EMA, progress; `tracking`: loggers, axes, summary, lineage, throughput
    cluster    Slurm and torchrun: signals, requeue, node and device counts
    compare    `python -m train.compare`; `zoo`: `python -m train.zoo`

docs/architecture.md draws the layers and the rule that keeps them apart (tests/test_layers.py checks it).
"""
