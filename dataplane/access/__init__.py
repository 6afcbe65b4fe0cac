"""Access control at the edge: policies compiled once per rule, checked before a backend.

Pure deciders (`ipfilter`, `apikeys`, `basicauth`, `jwtauth`) judge one request from
its head and the client address; `policy` composes them into the one object a rule's
`Selection` carries (None when the rule has no policy); `gate` is the I/O edge the
proxy calls: it applies a decision to the request, answers refusals, and suspends an
exchange while keys are fetched.
"""
