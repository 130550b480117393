"""Export of a ConFill with neighbour context (issue 20): the context travels in the ordinary ``values`` /
``observed`` inputs.

Bundle contract for a context model (card ``context`` entry, docs/ARCHITECTURE.md "Neighbour context"): the graph's
``values`` and ``observed`` are ``[B, L, C + G]``; columns ``0..C-1`` are the station's channels as before, columns
``C..C+G-1`` the G neighbour context channels (``gapcast.neighbours.build_context``: the weighted value of the
other stations at each step, normalised like the channel it estimates, and its 0/1 mask). The outputs are
``imputed [B, L, C + G]`` (context columns passed through as given) and ``forecast [B, H, C + G]`` (context
columns 0), so every backend, parity and golden check runs unchanged on one input width. A gateway without the
neighbours' windows feeds the context columns with mask 0: the model's no-context mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["ContextInputs", "context_card_entry", "n_context"]


def n_context(model: Any) -> int:
    """G, the context channels of a model (0 for a temporal-only model or any other module)."""
    return int(getattr(getattr(model, "cfg", None), "n_context", 0) or 0)


class ContextInputs(nn.Module):
    """The exported form of a context model: ``(values, observed, calendar)`` with ``C + G`` columns.

    The split and the padding are MatMuls with fixed 0/1 matrices (no Concat of a dynamic-batch zero tensor).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        C, G = int(model.cfg.n_channels), n_context(model)
        self.C, self.G = C, G
        eye = torch.eye(C + G)
        self.register_buffer("to_station", eye[:, :C].contiguous(), persistent=False)  # [C+G, C]
        self.register_buffer("to_context", eye[:, C:].contiguous(), persistent=False)  # [C+G, G]
        self.register_buffer("from_station", eye[:C].contiguous(), persistent=False)  # [C, C+G]
        self.register_buffer("from_context", eye[C:].contiguous(), persistent=False)  # [G, C+G]

    @property
    def cfg(self):
        return self.model.cfg

    def forward(self, values: torch.Tensor, observed: torch.Tensor, calendar: torch.Tensor):
        """Args:
            values: [B, L, C + G] float32 normalised, 0 where unobserved; the last G columns are the context.
            observed: [B, L, C + G] float32 0/1 (context columns: 1 where a neighbour reported).
            calendar: [B, L + H, F] float32.

        Returns:
            imputed [B, L, C + G] (context columns = the context as given), forecast [B, H, C + G] (context
            columns 0), float32 normalised.
        """
        x, m = torch.matmul(values, self.to_station), torch.matmul(observed, self.to_station)
        cx, cm = torch.matmul(values, self.to_context), torch.matmul(observed, self.to_context)
        imp, fc = self.model(x, m, calendar, cx, cm)
        imputed = torch.matmul(imp, self.from_station) + torch.matmul(cx * cm, self.from_context)
        return imputed, torch.matmul(fc, self.from_station)


def context_card_entry(spec: dict[str, Any], n_station_channels: int) -> dict[str, Any]:
    """The card's ``context`` entry: layout of the inputs and the context spec (neighbour lists and weights).

    Args:
        spec: ``ContextSpec.to_dict()`` from the checkpoint.
        n_station_channels: C.
    """
    C, G = int(n_station_channels), len(spec["channels"])
    return {
        "kind": "neighbours",
        "layout": "values/observed columns 0..C-1 are the station's channels, C..C+G-1 the neighbour context "
                  "(gapcast.neighbours.build_context); outputs have the same C+G columns (context passed through "
                  "in imputed, 0 in forecast)",
        "station_channels": C,
        "columns": list(range(C, C + G)),
        "channels": list(spec["channels"]),
        "spec": spec,
    }
