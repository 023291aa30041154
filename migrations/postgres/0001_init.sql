-- tollgate shared-mode schema, version 1: keys, limits, the change counter and the
-- billing ledger of record. Applied by `tollgate migrate` (and `serve` on start) inside one
-- transaction holding an advisory lock, so concurrent instances never race.
-- Timestamps are timestamptz; money is bigint micro-USD; tokens are bigint.

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    key_hash    text NOT NULL UNIQUE,      -- hex SHA-256 of the secret; the secret is never stored
    name        text NOT NULL,
    user_id     text,
    tenant_id   text,
    plan        text,
    status      text NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

-- Limits on a subject: 'key:k_…', 'user:…' or 'tenant:…'. One row per limit spec.
CREATE TABLE limits (
    subject     text NOT NULL,
    spec        text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (subject, spec)
);

-- One counter bumped by every change to keys or limits; instances poll it (every 250 ms)
-- and reload their key directory when it moves.
CREATE TABLE meta (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO meta (name, value) VALUES ('config_rev', 0);

-- SPEC §7: one row per trace id, written only by the instances' journal shippers.
CREATE TABLE billing_transactions (
    trace_id            text PRIMARY KEY,
    key_id              text NOT NULL,
    user_id             text,
    tenant_id           text,
    upstream            text NOT NULL,
    model               text NOT NULL,
    status              text NOT NULL CHECK (status IN ('reserved', 'settled', 'released')),
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    reasoning_tokens    bigint NOT NULL DEFAULT 0,
    reserved_micros     bigint NOT NULL DEFAULT 0,
    cost_micros         bigint NOT NULL DEFAULT 0,
    usage_source        text CHECK (usage_source IN ('upstream', 'estimated')),
    stream              boolean NOT NULL DEFAULT false,
    http_status         integer,
    started_at          timestamptz NOT NULL,
    settled_at          timestamptz,
    instance_id         text NOT NULL
);
CREATE INDEX billing_key_started ON billing_transactions (key_id, started_at);
CREATE INDEX billing_user_started ON billing_transactions (user_id, started_at) WHERE user_id IS NOT NULL;
CREATE INDEX billing_tenant_started ON billing_transactions (tenant_id, started_at) WHERE tenant_id IS NOT NULL;
CREATE INDEX billing_open ON billing_transactions (instance_id) WHERE status = 'reserved';
