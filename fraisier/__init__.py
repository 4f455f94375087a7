"""Fraisier: agentless deployments over SSH with atomic switches, health checks and rollback."""

__version__ = "0.1.0"
