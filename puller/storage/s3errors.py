"""What an S3 failure means to the user (puller/storage/s3.py raises these), and which body-read
errors a download resumes after. botocore is imported on first use only."""

from __future__ import annotations

from mesh import uripolicy
from mesh.errors import LoadFailed, quote_id


def describe(exc: BaseException, uri: str, bucket: str) -> LoadFailed | None:
    """A user's reason for a botocore error; None when `exc` is not one."""
    from botocore import exceptions as bx

    shown = uripolicy.show(uri)
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return LoadFailed(f"cannot read {shown}: bucket {quote_id(bucket, 70)} does not exist "
                              "at the pods' S3 endpoint")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return LoadFailed(f"cannot read {shown}: no such object in the bucket (NoSuchKey); check "
                              "the key, or give a prefix ending in / for a folder")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return LoadFailed(f"cannot read {shown}: S3 denied access (AccessDenied); give the pods "
                              "credentials that may read it (credentials_ref, or the pods' S3 credentials)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return LoadFailed(f"cannot read {shown}: S3 refused the credentials ({code}); renew the "
                              "Secret the model's credentials_ref (or the pods' S3 settings) names")
        if code in ("PreconditionFailed", "412"):
            return LoadFailed(f"cannot read {shown}: the object changed while it was downloaded; retry")
        return LoadFailed(f"cannot read {shown}: S3 answered {code or status}")
    if isinstance(exc, bx.NoCredentialsError):
        return LoadFailed(f"cannot read {shown}: this pod has no S3 credentials (set AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY, MESH_RUNTIME_S3_PROFILE, or the model's credentials_ref)")
    if isinstance(exc, bx.ProfileNotFound):
        return LoadFailed(f"cannot read {shown}: the pod's S3 profile (MESH_RUNTIME_S3_PROFILE) does not exist")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return LoadFailed(f"cannot read {shown}: no connection to the pods' S3 endpoint "
                          "(MESH_RUNTIME_S3_ENDPOINT_URL)")
    if isinstance(exc, bx.BotoCoreError):
        return LoadFailed(f"cannot read {shown}: S3 request failed ({type(exc).__name__})")
    return None


_RESUMABLE: tuple[type[BaseException], ...] = ()


def resumable() -> tuple[type[BaseException], ...]:
    """The errors of a body read cut short, after which the read resumes with a Range request
    (botocore and urllib3 imported on first use)."""
    global _RESUMABLE
    if not _RESUMABLE:
        from botocore import exceptions as bx
        from urllib3 import exceptions as ux

        _RESUMABLE = (bx.ResponseStreamingError, bx.ReadTimeoutError, bx.IncompleteReadError,
                      bx.ConnectionClosedError, ux.ProtocolError, ux.ReadTimeoutError, ConnectionError)
    return _RESUMABLE
