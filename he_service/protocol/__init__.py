"""Wire protocol shared by the server and the client SDK (numpy and tenseal only)."""

from he_service.protocol.batch_encoding import (
    BatchDecoding,
    BatchEncoding,
    decode_batch,
    encode_batch,
)
from he_service.protocol.card import CARD_VERSION, ModelCard, PlanCard
from he_service.protocol.encoding import (
    GatherEncoding,
    PrefixDecoding,
    decode_output,
    encode_input,
    preprocess,
    preprocess_rows,
)
from he_service.protocol.errors import ProtocolError
from he_service.protocol.framing import (
    CONTEXT_HEADER,
    MEDIA_TYPE,
    Buffer,
    decode_frames,
    encode_frames,
    frame_parts,
    framed_size,
    read_frames,
)
from he_service.protocol.keys import KeyBundle, decode_key_bundle, encode_key_bundle
from he_service.protocol.outputs import (
    OutputRanges,
    output_step,
    read_output_ranges,
    rows_out_of_range,
)
from he_service.protocol.params import CkksParams, galois_element, seal_context
from he_service.protocol.plans import PlanCosts, PlanKind, PlanLimits, Task
from he_service.protocol.seal_io import load_seal, save_seal
from he_service.protocol.seal_memory import save_seeded

__all__ = [
    "CARD_VERSION",
    "CONTEXT_HEADER",
    "MEDIA_TYPE",
    "BatchDecoding",
    "BatchEncoding",
    "Buffer",
    "CkksParams",
    "GatherEncoding",
    "KeyBundle",
    "ModelCard",
    "OutputRanges",
    "PlanCard",
    "PlanCosts",
    "PlanKind",
    "PlanLimits",
    "PrefixDecoding",
    "ProtocolError",
    "Task",
    "decode_batch",
    "decode_frames",
    "decode_key_bundle",
    "decode_output",
    "encode_batch",
    "encode_frames",
    "encode_input",
    "encode_key_bundle",
    "frame_parts",
    "framed_size",
    "galois_element",
    "load_seal",
    "output_step",
    "preprocess",
    "preprocess_rows",
    "read_frames",
    "read_output_ranges",
    "rows_out_of_range",
    "save_seal",
    "save_seeded",
    "seal_context",
]
