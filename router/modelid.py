"""Which model a V2 request is for, read without parsing the request.

`mm-vmodel-id` metadata wins, then `mm-model-id` (ModelMesh compatibility), else
ModelInferRequest.model_name (field 1) read straight from the serialized bytes. Which of them
names a vmodel rather than a model is router/vmodels.py's (resolved in router/tenancy.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mesh.errors import InvalidArgument, quote_id
from router import wire

VMODEL_HEADER = "mm-vmodel-id"
MODEL_HEADER = "mm-model-id"
MAX_MODEL_ID = 128  # the registry's limit (router.registry check_model_id): longer ids never exist


def model_name(request: bytes) -> str:
    """ModelInferRequest.model_name from the wire bytes ("" when unset).

    Checks the message's wire structure on the way (wire.check_infer_request: tensor payloads
    are skipped by length, never parsed), so corrupt bytes are INVALID_ARGUMENT here, not a
    trip to a pod; the last occurrence wins, as protobuf parsers do, so the router and the
    runtime pod always agree on the model.
    """
    return wire.check_infer_request(request)


def check_length(model_id: str) -> str:
    """Refuses an id no registered model can have before anything looks it up or echoes it
    (a 200,000-character id used to come back whole in the NOT_FOUND message)."""
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidArgument(
            f"invalid model id {quote_id(model_id)}: {len(model_id)} characters, ids have at most {MAX_MODEL_ID}"
        )
    return model_id


def headers(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, str]:
    """(mm-vmodel-id, mm-model-id) of the request ("" when absent). A vmodel id names a vmodel
    (router/vmodels.py) before a model of that name."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in (VMODEL_HEADER, MODEL_HEADER) and isinstance(value, str):
            found[key] = value
    return found.get(VMODEL_HEADER, ""), found.get(MODEL_HEADER, "")


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    vmodel, model = headers(metadata)
    return vmodel or model


def resolve(metadata: Iterable[tuple[str, Any]] | None, request: bytes) -> tuple[str, bytes]:
    """(model id, request bytes to forward).

    When the id comes from metadata and differs from model_name, a model_name field is
    appended to the bytes (a later field overrides an earlier one), so the pod serves the
    model the router routed for, as ModelMesh does.
    """
    header = from_metadata(metadata)
    body = model_name(request)
    model_id = header or body
    if not model_id:
        raise InvalidArgument("no model id: set ModelInferRequest.model_name or the mm-model-id header")
    check_length(model_id)
    if header and header != body:
        request = request + wire.string(1, header)
    return model_id, request
