"""The contract between the control plane and the dataplane.

The Snapshot types (`snapshot`), their JSON codec (`codec`), the configuration
protocol's names (`protocol`), the checks every Snapshot must pass (`validate`) and the
pure name rules both planes apply (`names`). Both planes import this package; it
imports nothing of Kanal's and knows neither of them.
"""
