"""The math of post-training quantization, as pure functions on tensors: no model, no pipeline, no config.

`quantizers` (fake-quantize, scales, range searches), `params` (one quantizer's scheme and tensors),
`observers` (activation ranges from calibration batches), `gptq` (the GPTQ solver, its input
statistics and weight grid), `gptaq` (GPTAQ's residual correction), `marr` (MARR's per-module α
search), `rotation` (Hadamard matrices and the folds of rotation-based PTQ) and `repq_reparam`
(RepQ-ViT's LayerNorm scale reparameterization). The pipelines (`hf_cd.quant.pipelines`) apply them
to a model; nothing here imports a pipeline, a runtime or a config.
"""
