"""gRPC plumbing: status mapping, the server interceptor, server lifecycle, channels."""
