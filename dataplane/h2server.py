"""The h2 library's server connection, with streams over the limit refused one by one.

h2 treats a HEADERS frame that would open more streams than our
SETTINGS_MAX_CONCURRENT_STREAMS as a connection error (GOAWAY(PROTOCOL_ERROR)): every
stream in flight on the connection fails for one stream too many, which a client may
open before it has read our SETTINGS. RFC 9113 5.1.2 makes it a stream error instead.
So here such a stream's header block is still decoded (the HPACK state stays in step
with the client's, and the header list limit applies while it expands), the stream is
reset with REFUSED_STREAM (a client may send it again, RFC 9113 8.7), and the owner
hears `StreamRefused` instead of the request: the other streams go on. A client that
keeps doing it is a flood, for the owner to end (GOAWAY(ENHANCE_YOUR_CALM)).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import Frame, HeadersFrame


class StreamRefused(h2.events.Event):
    """A stream the client opened over the limit was refused with REFUSED_STREAM."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"<StreamRefused stream_id:{self.stream_id}>"


class ServerConnection(h2.connection.H2Connection):
    """`H2Connection` for the server side, refusing streams over the limit alone."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        self._beyond_limit = False
        super().__init__(config=config)

    @property
    def open_inbound_streams(self) -> int:
        # While a stream over the limit is taken in (to be refused), h2's own check of
        # the limit must let it through.
        if self._beyond_limit:
            return 0
        return super().open_inbound_streams

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        stream_id = frame.stream_id
        if (stream_id in self.streams
                or self.open_inbound_streams < self.local_settings.max_concurrent_streams):
            return super()._receive_headers_frame(frame)
        self._beyond_limit = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._beyond_limit = False
        frames.extend(self.streams[stream_id].reset_stream(h2.errors.ErrorCodes.REFUSED_STREAM))
        kept = [event for event in events if getattr(event, "stream_id", None) != stream_id]
        return frames, [*kept, StreamRefused(stream_id)]
