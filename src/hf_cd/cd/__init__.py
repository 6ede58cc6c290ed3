"""Colinearity Decay itself, in plain PyTorch: the math, the matrix pairs, and the engine that applies it.

Nothing here knows about `transformers.Trainer`: a hand-written training loop calls
`hf_cd.cd.decay.ColinearityDecay.step` after ``optimizer.step()``. `hf_cd.training` is the adapter.

- `colinearity`: the equations (directions, alignment, power iterations), pure functions.
- `pairs`: which matrix pairs (A, B) of a model CD acts on, read from `hf_cd.architectures`.
- `weights`: where a pair's matrices come from (a parameter, or a LoRA layer's effective weight).
- `decay`: `ColinearityDecay`, the engine: batches pairs by shape and writes the update back.
- `settings`: `CDSettings`, the method's settings, declared and validated once.
"""
