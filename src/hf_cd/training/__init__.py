"""Colinearity Decay inside `transformers.Trainer`: the thin adapters around `hf_cd.cd`.

- `config`: `CDConfig`, `TrainingArguments` plus the ``cd_*``, ``tweo_*`` and ``qat_*`` fields.
- `callback`: `CDCallback`, CD for any Trainer; its state travels in ``trainer_state.json``.
- `trainer`: `CDTrainer`, which adds the callback, the TWEO penalty and QAT from a `CDConfig`.
- `tweo`: the TWEO activation penalty, the baseline CD is compared with.
- `checkpoints`, `resume`, `locking`: whole checkpoints, honest resumes, one run per ``output_dir``.
"""
