"""The configuration protocol's names: what the publisher serves and the subscriber calls.

A dataplane long-polls `GET SNAPSHOT_PATH?known=VERSION` (answered at once when another
version exists, else held) and answers each Snapshot with `POST ACK_PATH`. Both sides
carry the version in `VERSION_HEADER`. A dataplane keeps its last good Snapshot in
`STATE_FILE` under its state folder.
"""

SNAPSHOT_PATH = "/v1/snapshot"
ACK_PATH = "/v1/ack"
VERSION_HEADER = "X-Kanal-Version"
STATE_FILE = "snapshot.json"
