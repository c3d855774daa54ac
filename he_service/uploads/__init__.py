"""Staged uploads: a request too large for one body, sent in parts the server assembles.

A client opens an upload for one plan of one model (``POST /v1/models/{name}/uploads``), sends
framed ciphertexts in numbered parts (``PUT /v1/uploads/{id}/parts/{index}``), then asks for
the prediction (``POST /v1/uploads/{id}/predict``), which reads the parts in order, one at a
time, and deletes the upload. Parts are staged in a backend every worker shares: a directory
(``DiskStaging``, one host) or Redis (``RedisStaging``, any number of hosts); bounded in bytes
and open uploads per caller, and removed when they expire.
"""

from he_service.uploads._backend import (
    StagingBackend,
    StagingFull,
    StagingUnavailable,
    TooManyUploads,
    UploadError,
    UploadIncomplete,
    UploadInfo,
    UploadNotFound,
    UploadTooLarge,
    is_upload_id,
)
from he_service.uploads._disk import DiskStaging
from he_service.uploads._redis import RedisStaging
from he_service.uploads._store import Uploads

__all__ = [
    "DiskStaging",
    "RedisStaging",
    "StagingBackend",
    "StagingFull",
    "StagingUnavailable",
    "TooManyUploads",
    "UploadError",
    "UploadIncomplete",
    "UploadInfo",
    "UploadNotFound",
    "UploadTooLarge",
    "Uploads",
    "is_upload_id",
]
