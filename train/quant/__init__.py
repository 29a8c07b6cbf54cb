"""Quantization-aware training and int8 deployment (torchao PT2E with ExecuTorch's XNNPACK quantizer).

    backend   the quantizer, behind one function (its import path moves between releases)
    network   FakeQuantNetwork: the exported, fake-quantized graph as a trainable nn.Module that survives
              Lightning's train/eval switching (observers off whenever it evaluates, BN and observers freezable)
    schedule  the Lightning callback that freezes BN statistics and then observers at configured epochs
    deploy    convert to int8, write model_int8.pte (ExecuTorch) and model_int8.onnx (QDQ), run each in its runtime

Nothing here is imported unless qat=true (or an int8 export is asked for): the runtimes are an optional extra.
"""
