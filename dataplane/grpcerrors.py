"""gRPC errors as HTTP answers (pure, and free of protobuf).

What a transcoding rule answers when the call cannot be made or the method fails:
the HTTP status Google's API design guide maps each gRPC status to, and a
google.rpc.Status-shaped JSON body. Kept apart from `grpcjson` so that the proxy can
answer such errors without loading protobuf, which only a configuration with a
`grpcTranscoder` needs.
"""

from __future__ import annotations

import json

HTTP_FOR_GRPC = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
    10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}


class TranscodeError(ValueError):
    """A request that cannot be made into the method's message (answered 400)."""


def error_json(code: int, message: str) -> tuple[int, bytes]:
    """The HTTP status and JSON body of a gRPC error (google.rpc.Status's JSON shape)."""
    return HTTP_FOR_GRPC.get(code, 500), json.dumps({"code": code, "message": message}).encode()
