-- tollgate embedded schema, version 2: the journal (outbox) of shared mode.
--
-- In shared mode the ledger of record is Postgres. Every reserve / settle / release is
-- appended to `journal_events` (committed, WAL) before it is applied anywhere else; a
-- shipper moves unshipped events to Postgres and marks them shipped; shipped events are
-- deleted after `storage.journal_retention`. Embedded mode leaves these tables empty.

CREATE TABLE journal_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('reserve', 'settle', 'release')),
    payload     TEXT NOT NULL,             -- the full billing_transactions row after the event (JSON)
    created_at  TEXT NOT NULL,
    shipped_at  TEXT
);
CREATE INDEX journal_unshipped ON journal_events (seq) WHERE shipped_at IS NULL;
CREATE INDEX journal_shipped ON journal_events (shipped_at) WHERE shipped_at IS NOT NULL;

-- The latest state of every trace id this instance journaled (kept for the retention
-- period once final): answers 409 duplicate checks and crash recovery without Postgres.
CREATE TABLE journal_traces (
    trace_id    TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'released')),
    instance_id TEXT NOT NULL,
    row         TEXT NOT NULL,             -- the full row (JSON), as in the latest event
    updated_at  TEXT NOT NULL
);
CREATE INDEX journal_traces_open ON journal_traces (instance_id) WHERE status = 'reserved';
CREATE INDEX journal_traces_final ON journal_traces (updated_at) WHERE status <> 'reserved';

-- The last key directory read from Postgres, so an instance that (re)starts while
-- Postgres is down still authenticates known keys and enforces their limits.
CREATE TABLE directory_cache (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    rev       INTEGER NOT NULL,
    snapshot  TEXT NOT NULL,
    saved_at  TEXT NOT NULL
);
