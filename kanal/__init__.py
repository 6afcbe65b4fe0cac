"""Kanal: a Kubernetes ingress controller and service-mesh sidecar proxy.

The work lives in two subpackages: `kanal.operator` (control plane, command line)
and `kanal.dataplane` (the proxy). This package only names the distribution.
"""

__version__ = "0.1.0"
