-- tollgate shared-mode schema, version 2: what priced each settled row (SPEC §7).
-- Same columns and meanings as the embedded schema's version 4
-- (migrations/sqlite/0004_price_fields.sql); rows shipped before read 0 / NULL.

ALTER TABLE billing_transactions
    ADD COLUMN cache_write_1h_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN tool_calls bigint NOT NULL DEFAULT 0,
    ADD COLUMN service_tier text,
    ADD COLUMN price_version text;
