"""What the converter refuses, and the error that carries every refusal at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConversionError", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One reason a network cannot be converted, where it is, and what to do instead.

    ``path`` is the module path inside the model (``features.3``, as in
    ``model.get_submodule``) or, for a call written in ``forward``, the name torch.fx gives
    that call (``max_pool2d``).
    """

    path: str
    layer: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path} ({self.layer}): {self.reason}; {self.fix}"


class ConversionError(ValueError):
    """The network cannot be converted; ``problems`` lists every reason, not only the first."""

    def __init__(self, problems: Sequence[Problem], summary: str | None = None) -> None:
        self.problems = tuple(problems)
        head = summary or (
            f"cannot convert the network: {len(self.problems)} unsupported "
            f"layer{'s' if len(self.problems) != 1 else ''} or construct"
            f"{'s' if len(self.problems) != 1 else ''}"
        )
        lines = [head, *(f"  - {problem}" for problem in self.problems)]
        super().__init__("\n".join(lines))
