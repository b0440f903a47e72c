"""Discrete-event simulator of pipeline schedules, with timeline pictures and Chrome traces."""

from .costs import OpTimes, op_times, uniform_chain_costs, unit_device
from .engine import SimResult, format_slot_grid, simulate, simulate_times, slot_grid, unit_times

__all__ = ["OpTimes", "SimResult", "format_slot_grid", "op_times", "simulate", "simulate_times",
           "slot_grid", "uniform_chain_costs", "unit_device", "unit_times"]
