"""Released outputs that know the model's calibrated ranges, and the warning they raise."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from he_service.protocol import ModelCard, OutputRanges, rows_out_of_range

__all__ = ["OutOfRangeWarning", "Outputs", "flagged_outputs"]


class OutOfRangeWarning(UserWarning):
    """Some decrypted outputs lie outside the model's calibrated ranges: they are unreliable.

    The polynomial activations are accurate only on inputs like the calibration data; an input
    far from it gives confident nonsense. ``Outputs.out_of_range`` says which samples.
    """


class Outputs(np.ndarray):
    """Decrypted outputs: one sample's (1-D) or one row per sample (2-D), as a float array.

    Works wherever an array does (``np.asarray``, ``argmax``, indexing); indexing rows keeps
    the type and the ranges, a column or an element gives plain numpy values, and so does
    arithmetic. ``out_of_range`` is computed from the stored ranges, so it follows slicing.
    """

    ranges: OutputRanges | None
    width: int  # outputs per sample

    def __new__(cls, values: Any, ranges: OutputRanges | None) -> Outputs:
        obj = np.asarray(values, dtype=np.float64).view(cls)
        obj.ranges, obj.width = ranges, obj.shape[-1]
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.ranges = getattr(obj, "ranges", None)
        self.width = getattr(obj, "width", self.shape[-1] if self.ndim else 0)

    def __array_wrap__(
        self, array: np.ndarray, context: Any = None, return_scalar: bool = False
    ) -> Any:
        # Computed values are no longer released outputs: give them back as plain numpy.
        plain = np.asarray(array)
        return plain[()] if return_scalar else plain

    def __getitem__(self, key: Any) -> Any:
        result = super().__getitem__(key)
        if isinstance(result, Outputs) and not _selects_rows(self.ndim, key):
            return result.view(np.ndarray)
        return result

    @property
    def out_of_range(self) -> np.ndarray | bool:
        """Return, per sample, whether an output lies outside its calibrated range.

        A bool for one sample's outputs, a bool array for rows; all False when the model
        publishes no ranges.

        Raises:
            ValueError: the array no longer holds whole samples' outputs (say, ``argmax``).
        """
        if self.ndim not in (1, 2) or self.shape[-1] != self.width or self.dtype != np.float64:
            raise ValueError(
                f"an array of shape {self.shape} and dtype {self.dtype} does not hold samples' "
                f"outputs ({self.width} floats each): out_of_range is undefined for it"
            )
        rows = np.asarray(self).reshape(-1, self.width)
        flags = (
            np.zeros(len(rows), dtype=bool)
            if self.ranges is None
            else rows_out_of_range(rows, self.ranges)
        )
        return bool(flags[0]) if self.ndim == 1 else flags


def _selects_rows(ndim: int, key: Any) -> bool:
    """Tell whether indexing rows of samples with ``key`` keeps whole rows of outputs."""
    if ndim != 2:
        return False  # one sample's outputs: any index picks among outputs
    if isinstance(key, tuple):
        if len(key) == 2 and isinstance(key[1], slice) and key[1] == slice(None):
            key = key[0]
        elif len(key) == 1:
            key = key[0]
        else:
            return False
    return key is not None and key is not Ellipsis and np.ndim(key) <= 1


def flagged_outputs(values: np.ndarray, card: ModelCard, *, stacklevel: int) -> Outputs:
    """Wrap released outputs with the card's ranges; warn if some samples are outside them.

    Args:
        values: released outputs, one row per sample.
        card: the model's card.
        stacklevel: where the warning points, counted from the caller of this function.
    """
    outputs = Outputs(values, card.output_ranges)
    outside = int(np.count_nonzero(outputs.out_of_range))
    if outside:
        warnings.warn(
            f"{outside} of {len(outputs)} samples have outputs outside the calibrated ranges of "
            f"model {card.name!r}: their inputs are unlike its calibration data and the results "
            "are unreliable (the out_of_range field of the outputs says which)",
            OutOfRangeWarning,
            stacklevel=stacklevel + 1,
        )
    return outputs
