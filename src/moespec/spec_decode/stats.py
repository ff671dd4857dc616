"""The speculation counters of one batch: written by speculative_step and the step engine, read into each
Output's stats (outputs.py) and by the draft-length controller (as differences between steps)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    steps: int = 0                      # speculative steps
    row_steps: int = 0                  # rows verified, summed over steps
    drafted: int = 0                    # draft depth, summed over row steps (a tree counts its depth)
    draft_nodes: int = 0                # draft tokens (a tree counts every node)
    accepted: int = 0                   # drafts accepted
    accepted_per_pos: dict[int, int] = field(default_factory=dict)    # draft position -> accepted there
    draft_s: float = 0.0
    verify_s: float = 0.0
    verify_tokens: int = 0              # tokens through the verification forward (rows x width, padding included)
    verify_experts: int = 0             # distinct experts computed, summed over MoE layers and verifications
    verify_layers: int = 0              # MoE layers run by verifications
    plain_steps: int = 0                # steps the controller chose to run without a draft
    controller: dict | None = None      # draft length "auto": what the controller saw and chose (its stats())
