-- tollgate embedded schema, version 1: keys, limits and the billing ledger.
-- Timestamps are UTC text in one fixed format (YYYY-MM-DDTHH:MM:SS.ffffffZ) so that
-- text order is time order and window sums can use the index.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    key_hash    TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the secret; the secret is never stored
    name        TEXT NOT NULL,
    user_id     TEXT,
    tenant_id   TEXT,
    plan        TEXT,
    status      TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

-- Limits on a subject: 'key:k_…', 'user:…' or 'tenant:…'. One row per limit spec.
CREATE TABLE limits (
    subject     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (subject, spec)
);

-- A single counter bumped by every change to keys or limits; running instances poll it
-- to refresh their caches within a second.
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('config_rev', 0);

CREATE TABLE billing_transactions (
    trace_id            TEXT PRIMARY KEY,
    key_id              TEXT NOT NULL,
    user_id             TEXT,
    tenant_id           TEXT,
    upstream            TEXT NOT NULL,
    model               TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'released')),
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens    INTEGER NOT NULL DEFAULT 0,
    reserved_micros     INTEGER NOT NULL DEFAULT 0,
    cost_micros         INTEGER NOT NULL DEFAULT 0,
    usage_source        TEXT CHECK (usage_source IN ('upstream', 'estimated')),
    stream              INTEGER NOT NULL DEFAULT 0,
    http_status         INTEGER,
    started_at          TEXT NOT NULL,
    settled_at          TEXT,
    instance_id         TEXT NOT NULL
);
CREATE INDEX billing_key_started ON billing_transactions (key_id, started_at);
CREATE INDEX billing_user_started ON billing_transactions (user_id, started_at);
CREATE INDEX billing_tenant_started ON billing_transactions (tenant_id, started_at);
CREATE INDEX billing_open ON billing_transactions (status) WHERE status = 'reserved';
