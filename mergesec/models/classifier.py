"""A sequence classifier: any Hugging Face encoder, mean pooling, one linear head."""

from __future__ import annotations

import torch
from torch import nn


class SequenceClassifier(nn.Module):
    """``backbone`` (an ``AutoModel``) + masked mean pooling + ``head``.

    Mean pooling matches how sentence encoders such as all-MiniLM-L6-v2 were trained.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)
        h = out.last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask, **kw)))

    def set_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.head = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
