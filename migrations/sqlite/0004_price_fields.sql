-- tollgate embedded schema, version 4: what priced each settled row (SPEC §7).
--
-- cache_write_1h_tokens  the 1-hour part of cache_write_tokens (Anthropic
--                        cache_creation.ephemeral_1h_input_tokens, OpenAI long-lifetime writes)
-- tool_calls             server tool calls billed per call (web searches)
-- service_tier           the tier the row was priced at (the served tier, else the asked one);
--                        NULL = standard rates
-- price_version          digest of the price entry that priced the row (`tollgate prices`);
--                        NULL = no entry priced it (unknown model under `free`, a recovered
--                        reservation billed at its hold, or a row settled before version 4)
--
-- Rows written before this migration read 0 / NULL: their 1-hour writes, if any, are inside
-- cache_write_tokens and their price version is unknown.

ALTER TABLE billing_transactions ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE billing_transactions ADD COLUMN tool_calls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE billing_transactions ADD COLUMN service_tier TEXT;
ALTER TABLE billing_transactions ADD COLUMN price_version TEXT;
