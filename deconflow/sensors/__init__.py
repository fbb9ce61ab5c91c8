"""Sensors: the watchdog for failed and stuck training partitions, and its alerts."""

from deconflow.sensors.alerts import AlertWebhook
from deconflow.sensors.policy import Cursor, Decision, RunInfo, WatchdogSettings, decide
from deconflow.sensors.watchdog import TickReport, build_watchdog_sensor, evaluate_tick

__all__ = [
    "AlertWebhook",
    "Cursor",
    "Decision",
    "RunInfo",
    "TickReport",
    "WatchdogSettings",
    "build_watchdog_sensor",
    "decide",
    "evaluate_tick",
]
