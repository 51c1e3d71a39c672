"""TRL's SFTTrainer as this project runs it: the one place its behaviour is overridden."""

from __future__ import annotations

from trl import SFTTrainer


class RunSFTTrainer(SFTTrainer):
    def create_model_card(self, *args, **kwargs) -> None:
        """TRL writes a stub card ("a fine-tuned version of [None]") into checkpoints/ at every save.
        The run folder's README.md is the card (common/after_training/model_card.py); a second one
        that says nothing true would be the one a user finds first in checkpoints/."""
