"""ponder's PRM class in the Qwen2.5-Math-PRM layout: a Qwen2 body and a two-label score head read at step tags.

transformers ships no class for this layout (the published weights come with remote code), so ponder keeps this
small one. It loads the published Qwen2.5-Math-PRM weights (same parameter names: `model.*`, `score.0`, `score.2`),
trains under DeepSpeed, and vLLM serves the same checkpoint natively (`Qwen2ForProcessRewardModel`).
The step score is P(label 1 = "good") at each step tag token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.num_labels = getattr(config, "num_labels", 2) or 2
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, self.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        step_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        """step_labels: float [B, T], the soft label p in [0, 1] at step-tag positions and -1 elsewhere.

        The loss is cross-entropy against (1 - p, p) at the tag positions only (the soft MC label as target).
        """
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        logits = self.score(out.last_hidden_state)
        loss = None
        if step_labels is not None:
            loss = soft_label_loss(logits, step_labels)
        return TokenClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def step_scores(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, step_tag_id: int) -> list[list[float]]:
        """P(good) at every step-tag token, one list per row."""
        logits = self(input_ids=input_ids, attention_mask=attention_mask).logits
        probs = logits.float().softmax(-1)[..., 1]
        mask = (input_ids == step_tag_id) & attention_mask.bool()
        return [probs[i][mask[i]].tolist() for i in range(input_ids.shape[0])]


def soft_label_loss(logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    mask = step_labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    p = step_labels[mask].to(logits.dtype)
    target = torch.stack([1 - p, p], dim=-1)
    return F.cross_entropy(logits[mask].float(), target.float())
