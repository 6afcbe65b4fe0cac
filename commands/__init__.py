"""The `kanal` command line: it sits above both planes and wires them to processes.

`kanal run` (files to a dataplane, in one process or a supervisor with workers),
`kanal dataplane` (a subscriber to the control plane), `kanal operator` (kopf),
`kanal validate` and `kanal crds`. Each sub-command imports its machinery lazily, so a
sidecar never loads pydantic or kopf and `kanal validate` never loads the proxy.
"""
