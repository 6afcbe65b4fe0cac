"""Loading a PEM certificate chain and key given as text into an SSLContext.

Both planes need it: the dataplane to serve a Route's certificate, the file source of
`kanal run` to refuse a Secret OpenSSL cannot load before it reaches the dataplane.
`load_cert_chain` reads paths only; on Linux the PEMs go through an anonymous memory
file and never touch a disk. This is the one module of the contract that does I/O
(a memory file), so the pure-core contract in pyproject.toml does not list it.
"""

from __future__ import annotations

import os
import ssl
import tempfile


def load_pem_pair(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Load a certificate chain and its key; raises ssl.SSLError (or ValueError) when
    OpenSSL refuses them."""
    data = (cert_pem.rstrip("\n") + "\n" + key_pem.rstrip("\n") + "\n").encode()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("kanal-pem", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="kanal-", suffix=".pem")  # pragma: no cover - not Linux
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
