"""Telemetry simulator with fault injection (pure and seeded; transports apart)."""

from __future__ import annotations

from simulator.generator import FAULT_KINDS, MAX_READINGS, Fault, FleetSimulation, check_size, default_faults, simulate

__all__ = ["FAULT_KINDS", "MAX_READINGS", "Fault", "FleetSimulation", "check_size", "default_faults", "simulate"]
