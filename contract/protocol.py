"""The configuration protocol's names: what the publisher serves and the subscriber calls.

A dataplane long-polls `GET SNAPSHOT_PATH?known=VERSION` (answered at once when another
version exists, else held) and answers each Snapshot with `POST ACK_PATH`. Both sides
carry the version in `VERSION_HEADER`. A dataplane keeps its last good Snapshot in
`STATE_FILE` under its state folder. Every few seconds a dataplane with weighted rules
posts what its splits did (`kanal.contract.splits`) to `REPORT_PATH`, for the Routes'
`SplitObserved` condition.
"""

SNAPSHOT_PATH = "/v1/snapshot"
ACK_PATH = "/v1/ack"
REPORT_PATH = "/v1/report"
VERSION_HEADER = "X-Kanal-Version"
STATE_FILE = "snapshot.json"
