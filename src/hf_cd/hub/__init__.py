"""Share CD-trained checkpoints on the Hugging Face Hub, with their quantized accuracy in the model card.

Why: someone who pulls a CD-trained model should know how it holds up at W8A8 / W6A6 / W4A4
without measuring it again. The card carries the numbers twice. A table is there for people. The
``model-index`` metadata, with one `huggingface_hub.EvalResult` per pipeline and bit width, is there
for programs, and `read_quantized_results` parses it back into rows::

    from hf_cd.hub import load_cd_checkpoint, push_cd_model, read_quantized_results, write_model_card

    write_model_card(output_dir, results)                     # README.md beside the safetensors weights
    write_model_card(output_dir, evaluate_quantized(...))     # or the quantized table alone
    push_cd_model("user/vit-cd", output_dir, dry_run=True)    # the exact files and card it would upload
    model, processor, results = load_cd_checkpoint("user/vit-cd")
    results.accuracy("repq", 4, 4)

Safety rules:

- Weights are safetensors only. Pickle weights need ``allow_pickle=True``.
- Tokens never appear in logs, errors or cards.
- A malformed card raises `ModelCardError`, and the message names the field.
- A Hub failure (offline, no token, no such repo) raises a one-line `HubAccessError` that says
  what to do.

The modules: `card` writes the card from three parts, `card_facts` (what a run measured),
`card_metadata` (the YAML metadata and its ``model-index``) and `card_render` (the markdown);
`parse` reads a card back, `transfer` loads and pushes checkpoints, and `errors` holds the
exceptions and turns Hub failures into clear errors.
"""

from hf_cd.hub.card import build_model_card, write_model_card
from hf_cd.hub.card_facts import results_from_table, trainer_results
from hf_cd.hub.card_metadata import CARD_COLUMNS, CARD_TAGS, CD_TAGS
from hf_cd.hub.card_render import card_template
from hf_cd.hub.errors import HubAccessError, IncompleteResultsWarning, ModelCardError, UnsafeWeightsError
from hf_cd.hub.parse import read_quantized_results
from hf_cd.hub.transfer import HubUpload, load_cd_checkpoint, push_cd_model

__all__ = [
    "CARD_COLUMNS",
    "CARD_TAGS",
    "CD_TAGS",
    "HubAccessError",
    "HubUpload",
    "IncompleteResultsWarning",
    "ModelCardError",
    "UnsafeWeightsError",
    "build_model_card",
    "card_template",
    "load_cd_checkpoint",
    "push_cd_model",
    "read_quantized_results",
    "results_from_table",
    "trainer_results",
    "write_model_card",
]
