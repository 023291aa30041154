-- tollgate embedded schema, version 5: journal events the ledger of record refused.
--
-- In shared mode a row Postgres refuses for its data (SQLSTATE class 22 or 23: a NUL byte
-- in a text value, an out-of-range number) can never ship as it is. The shipper copies
-- the event here with Postgres' error, marks it shipped, and ships the rows behind it.
-- The copy outlives the journal's retention; a replay that ships the event (after the
-- cause is fixed: `tollgate journal replay --all`) removes it again. Embedded mode leaves
-- the table empty.

CREATE TABLE journal_quarantine (
    seq             INTEGER PRIMARY KEY,   -- journal_events.seq of the refused event
    trace_id        TEXT NOT NULL,
    payload         TEXT NOT NULL,         -- the full row as in the event (JSON)
    error           TEXT NOT NULL,         -- Postgres' SQLSTATE and message
    quarantined_at  TEXT NOT NULL
);
CREATE INDEX journal_quarantine_trace ON journal_quarantine (trace_id);
