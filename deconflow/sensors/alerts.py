"""Alerts: a JSON POST to an optional webhook, as a Dagster resource.

The sensor also writes every alert to its tick log and to the failed run's ``deconflow/alert``
tag, so the UI shows it even when no webhook is configured.
"""

from __future__ import annotations

import json
import urllib.request

import dagster as dg

from deconflow import settings as _settings


class AlertWebhook(dg.ConfigurableResource):
    """POSTs each alert as JSON to ``url`` (default: env ``DECONFLOW_ALERT_WEBHOOK``; none: off).

    Body: ``{kind, partition, cell, class, attempts, reason, last_log_lines, run_id}``.
    A failing webhook never fails the sensor tick: the error is returned for the tick log.
    """

    url: str | None = None
    timeout_s: float = 5.0

    def target(self) -> str | None:
        return self.url or _settings.get("DECONFLOW_ALERT_WEBHOOK") or None

    def post(self, alert: dict) -> str | None:
        """Send one alert; returns an error message, or None when sent (or no URL is set)."""
        url = self.target()
        if not url:
            return None
        req = urllib.request.Request(
            url,
            data=json.dumps(alert).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                resp.read()
            return None
        except Exception as e:  # network errors of any kind: report, don't raise
            return f"webhook {url} failed: {e}"
