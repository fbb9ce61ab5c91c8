"""Quality gates (GO / NO-GO) of SPEC section 4, evaluated with SQL on the published file."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from deconflow.protocol import COMPLETED


def quality_gates(db_path: Path) -> pd.DataFrame:
    """GO / NO-GO gates of SPEC section 4, evaluated with SQL on the published database."""
    con = duckdb.connect(str(db_path), read_only=True)
    q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    ok_runs = f"SELECT run_id FROM runs WHERE outcome = '{COMPLETED}'"
    gates = []

    def gate(name: str, bad: int, detail: str) -> None:
        gates.append({"gate": name, "passed": bad == 0, "violations": int(bad), "detail": detail})

    try:
        gate(
            "loss in [0, 10]",
            q(
                f"SELECT count(*) FROM batch_metrics WHERE run_id IN ({ok_runs}) "
                "AND NOT (loss_nats BETWEEN 0 AND 10)"
            ),
            "batch rows of completed runs with loss outside [0, 10]",
        )
        gate(
            "accuracy in [0, 1]",
            q(
                "SELECT (SELECT count(*) FROM batch_metrics WHERE NOT "
                "(accuracy BETWEEN 0 AND 1)) + (SELECT count(*) FROM "
                "val_metrics WHERE NOT (val_accuracy BETWEEN 0 AND 1))"
            ),
            "batch and validation rows with accuracy outside [0, 1]",
        )
        gate(
            "lr > 0",
            q("SELECT count(*) FROM batch_metrics WHERE NOT (lr > 0)"),
            "batch rows with a learning rate <= 0",
        )
        nonfinite = " OR ".join(f"NOT isfinite({c})" for c in ("loss_nats", "accuracy", "lr"))
        vnonfinite = " OR ".join(
            f"NOT isfinite({c})" for c in ("val_loss", "val_accuracy", "weight_norm")
        )
        gate(
            "no NaN/inf outside diverged runs",
            q(
                f"SELECT (SELECT count(*) FROM batch_metrics WHERE run_id IN ({ok_runs}) AND "
                f"({nonfinite})) + (SELECT count(*) FROM val_metrics WHERE run_id IN ({ok_runs}) "
                f"AND ({vnonfinite}))"
            ),
            "non-finite metric rows in runs that did not diverge",
        )
        gate(
            "knee epoch in [1, 20]",
            q(
                f"SELECT count(*) FROM run_fits WHERE outcome = '{COMPLETED}' AND "
                "(knee_epoch IS NULL OR isnan(knee_epoch) OR NOT (knee_epoch BETWEEN 1 AND 20))"
            ),
            "completed runs whose burn-in knee is missing or outside epochs 1..20",
        )
        bad_freq = (
            con.execute(f"""
            WITH c AS (
              SELECT r.run_id, CAST(r.steps AS BIGINT) AS steps, s.steps_per_epoch, s.epochs,
                     s.val_per_epoch, s.hessian_every, s.noise_every_epochs,
                (SELECT count(*) FROM batch_metrics b WHERE b.run_id = r.run_id) AS nb,
                (SELECT count(*) FROM val_metrics v WHERE v.run_id = r.run_id) AS nv,
                (SELECT count(*) FROM curvature_metrics h WHERE h.run_id = r.run_id) AS nh,
                (SELECT count(*) FROM noise_metrics n WHERE n.run_id = r.run_id) AS nn
              FROM runs r JOIN run_settings s USING (run_id)
              WHERE r.run_id IN ({ok_runs}))
            SELECT list(run_id) FROM c WHERE nb <> steps
              OR nv <> epochs * val_per_epoch
              OR nh <> (CASE WHEN hessian_every > 0 THEN steps // hessian_every ELSE 0 END)
              OR nn <> (CASE WHEN noise_every_epochs > 0 THEN epochs // noise_every_epochs
                        ELSE 0 END)
        """).fetchone()[0]
            or []
        )
        gate(
            "logging frequencies as in SPEC section 3",
            len(bad_freq),
            "completed runs with missing or extra metric rows: " + ", ".join(bad_freq[:10]),
        )
    finally:
        con.close()
    return pd.DataFrame(gates)
