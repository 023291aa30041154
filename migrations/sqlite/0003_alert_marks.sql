-- tollgate embedded schema, version 3: which threshold alerts have fired.
-- One row per (subject, limit spec, threshold): `window_start` names the alert period the
-- mark belongs to (calendar window start, the epoch-aligned period of a rolling window,
-- or 'total'). A mark of an older period is overwritten when the threshold fires again in
-- a newer one, so the table holds at most (limits × thresholds) rows.

CREATE TABLE alert_marks (
    subject       TEXT NOT NULL,
    spec          TEXT NOT NULL,
    threshold     INTEGER NOT NULL CHECK (threshold BETWEEN 1 AND 100),
    window_start  TEXT NOT NULL,
    fired_at      TEXT NOT NULL,
    PRIMARY KEY (subject, spec, threshold)
);
