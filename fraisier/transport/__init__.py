"""Transports that run commands on a host: a long-lived SSH shell, or the controller itself."""

from __future__ import annotations

from fraisier.transport.base import CommandResult, Transport, wrap_command


def open_transport(host, settings) -> Transport:
    """Return an unconnected transport for an inventory host."""
    if host.is_local:
        from fraisier.transport.local import LocalTransport

        return LocalTransport(host)
    from fraisier.transport.ssh import SSHTransport

    return SSHTransport(host, settings)


__all__ = ["CommandResult", "Transport", "open_transport", "wrap_command"]
