"""Quantization-aware training and int8 deployment (torchao PT2E with ExecuTorch's XNNPACK quantizer).

    backend   the quantizer, behind one function (its import path moves between releases)
    network   FakeQuantNetwork: the exported, fake-quantized graph as a trainable nn.Module that survives
              Lightning's train/eval switching (observers off whenever it evaluates, BN and observers freezable)
    patterns  torchao's pattern graphs exported once per process (a convert 5x faster)
    recipe    `qat=true`'s parts: init_from's float weights, the freeze schedule (QATSchedule), PTQ calibration, and
              the int8 files beside a float export
    deploy    convert to int8, write model_int8.pte (ExecuTorch) and model_int8.onnx (QDQ), run each in its runtime

The int8 runtimes (torchao, ExecuTorch) are imported only when a quantizer is asked for (`backend.require`): runs
without qat=true never import them, so they stay an optional extra.
"""
