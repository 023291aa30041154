-- tollgate embedded schema, version 7: hourly spend rollups and the retention watermark.
--
-- Two rollups of the settled and released ledger rows, per UTC hour of `started_at`:
-- `spend_hourly` per (status, key, user, tenant, upstream, model) serves every report and
-- the counter loaders; `spend_hourly_model` per (status, upstream, model) serves the
-- reports that neither group nor filter by key, user or tenant (a month by day and model
-- reads a few thousand rows instead of every (key, model) pair of every hour).
--
-- The triggers below keep both exact in the same transaction as every write of a ledger
-- row, whoever writes it (settle, release, reuse of a released trace id, adjustment
-- rows): an insert adds the new row, an update takes the old row out and puts the new one
-- in, a delete takes the row out — except inside a retention pass (`storage.retention`),
-- which marks its own transaction with a `meta` row named 'retention_pass' (no other
-- connection ever sees it) and deletes rows that stay counted here, so reports and
-- counter loaders keep counting them. A rollup row whose rows all went away stays with
-- `requests = 0` (readers skip it).
--
-- Bound: a rollup row sums one hour of one group; ledger counts are clamped to 2^40
-- per row (engine::MAX_TOKEN_COUNT), so its sums stay below 2^63 for any group of fewer
-- than 2^23 (8 million) rows an hour.
--
-- Spend reports read whole hours from here and only the hours they must cut (a `since`
-- or `until` inside an hour, a bucket bound inside an hour in `[quota].timezone`) from
-- the ledger. `user_id` / `tenant_id` are '' when the ledger row has none (user and
-- tenant names are never empty).

CREATE TABLE spend_hourly (
    hour                TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('settled', 'released')),
    key_id              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    tenant_id           TEXT NOT NULL,
    upstream            TEXT NOT NULL,
    model               TEXT NOT NULL,
    requests            INTEGER NOT NULL,
    input_tokens        INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    cost_micros         INTEGER NOT NULL,
    estimated           INTEGER NOT NULL,
    PRIMARY KEY (hour, status, key_id, user_id, tenant_id, upstream, model)
) WITHOUT ROWID;

CREATE TABLE spend_hourly_model (
    hour                TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('settled', 'released')),
    upstream            TEXT NOT NULL,
    model               TEXT NOT NULL,
    requests            INTEGER NOT NULL,
    input_tokens        INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    cost_micros         INTEGER NOT NULL,
    estimated           INTEGER NOT NULL,
    PRIMARY KEY (hour, status, upstream, model)
) WITHOUT ROWID;

-- Counter loaders read one subject's hours before the retention watermark.
CREATE INDEX spend_hourly_key ON spend_hourly (key_id, hour);
CREATE INDEX spend_hourly_user ON spend_hourly (user_id, hour);
CREATE INDEX spend_hourly_tenant ON spend_hourly (tenant_id, hour);

-- The ledger hours a report must cut, and the retention pass, find rows by start time.
CREATE INDEX billing_started ON billing_transactions (started_at);

CREATE TRIGGER spend_hourly_insert AFTER INSERT ON billing_transactions
WHEN NEW.status IN ('settled', 'released')
BEGIN
    INSERT INTO spend_hourly VALUES (
        substr(NEW.started_at, 1, 13) || ':00:00.000000Z',
        NEW.status,
        NEW.key_id,
        COALESCE(NEW.user_id, ''),
        COALESCE(NEW.tenant_id, ''),
        NEW.upstream,
        NEW.model,
        1,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
    INSERT INTO spend_hourly_model VALUES (
        substr(NEW.started_at, 1, 13) || ':00:00.000000Z',
        NEW.status,
        NEW.upstream,
        NEW.model,
        1,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
END;

CREATE TRIGGER spend_hourly_update_old AFTER UPDATE ON billing_transactions
WHEN OLD.status IN ('settled', 'released')
BEGIN
    UPDATE spend_hourly SET
        requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND key_id = OLD.key_id AND user_id = COALESCE(OLD.user_id, '') AND tenant_id = COALESCE(OLD.tenant_id, '') AND upstream = OLD.upstream AND model = OLD.model;
    UPDATE spend_hourly_model SET
        requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND upstream = OLD.upstream AND model = OLD.model;
END;

CREATE TRIGGER spend_hourly_update_new AFTER UPDATE ON billing_transactions
WHEN NEW.status IN ('settled', 'released')
BEGIN
    INSERT INTO spend_hourly VALUES (
        substr(NEW.started_at, 1, 13) || ':00:00.000000Z',
        NEW.status,
        NEW.key_id,
        COALESCE(NEW.user_id, ''),
        COALESCE(NEW.tenant_id, ''),
        NEW.upstream,
        NEW.model,
        1,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
    INSERT INTO spend_hourly_model VALUES (
        substr(NEW.started_at, 1, 13) || ':00:00.000000Z',
        NEW.status,
        NEW.upstream,
        NEW.model,
        1,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
END;

CREATE TRIGGER spend_hourly_delete AFTER DELETE ON billing_transactions
WHEN OLD.status IN ('settled', 'released')
    AND NOT EXISTS (SELECT 1 FROM meta WHERE name = 'retention_pass')
BEGIN
    UPDATE spend_hourly SET
        requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND key_id = OLD.key_id AND user_id = COALESCE(OLD.user_id, '') AND tenant_id = COALESCE(OLD.tenant_id, '') AND upstream = OLD.upstream AND model = OLD.model;
    UPDATE spend_hourly_model SET
        requests = requests - 1,
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND upstream = OLD.upstream AND model = OLD.model;
END;

-- Rows already in the ledger.
INSERT INTO spend_hourly
SELECT substr(started_at, 1, 13) || ':00:00.000000Z', status, key_id, COALESCE(user_id, ''), COALESCE(tenant_id, ''), upstream, model,
       COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros),
       SUM(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)
FROM billing_transactions WHERE status IN ('settled', 'released')
GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO spend_hourly_model
SELECT substr(started_at, 1, 13) || ':00:00.000000Z', status, upstream, model,
       COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros),
       SUM(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)
FROM billing_transactions WHERE status IN ('settled', 'released')
GROUP BY 1, 2, 3, 4;

-- Every settled or released row that started before `retained_before` (seconds since the
-- epoch, a whole UTC hour) has been deleted by a retention pass, or will be by the pass
-- that set it, and is counted from the rollups. 0: nothing deleted yet.
INSERT INTO meta (name, value) VALUES ('retained_before', 0);
