-- tollgate shared-mode schema, version 3: hourly spend rollups and the retention watermark.
--
-- Two rollups of the settled and released ledger rows, per UTC hour of `started_at`:
-- `spend_hourly` per (status, key, user, tenant, upstream, model) serves every report and
-- the counter loaders; `spend_hourly_model` per (status, upstream, model) serves the
-- reports that neither group nor filter by key, user or tenant.
--
-- Statement triggers keep both exact in the same transaction as every write of ledger
-- rows, whoever writes them (the instances' shippers, adjustment rows): an insert adds
-- the new rows, an update takes the old rows out and puts the new ones in, a delete takes
-- the rows out — except inside a retention pass (`storage.retention`), which sets
-- `tollgate.retention_pass` for its own transaction (SET LOCAL) and deletes rows that
-- stay counted here, so reports and counter loaders keep counting them. Each statement's
-- rows are summed first and written in key order, so concurrent shippers touching the
-- same hours take the rollup rows' locks in one order.
--
-- Bound: a rollup row sums one hour of one group; ledger counts are clamped to 2^40
-- per row (engine::MAX_TOKEN_COUNT), so its sums stay below 2^63 for any group of fewer
-- than 2^23 (8 million) rows an hour.
--
-- `user_id` / `tenant_id` are '' when the ledger row has none (names are never empty).

CREATE TABLE spend_hourly (
    hour                timestamptz NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('settled', 'released')),
    key_id              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    tenant_id           TEXT NOT NULL,
    upstream            TEXT NOT NULL,
    model               TEXT NOT NULL,
    requests            bigint NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    reasoning_tokens    bigint NOT NULL,
    cost_micros         bigint NOT NULL,
    estimated           bigint NOT NULL,
    PRIMARY KEY (hour, status, key_id, user_id, tenant_id, upstream, model)
);

CREATE TABLE spend_hourly_model (
    hour                timestamptz NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('settled', 'released')),
    upstream            TEXT NOT NULL,
    model               TEXT NOT NULL,
    requests            bigint NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    reasoning_tokens    bigint NOT NULL,
    cost_micros         bigint NOT NULL,
    estimated           bigint NOT NULL,
    PRIMARY KEY (hour, status, upstream, model)
);

-- Counter loaders read one subject's hours before the retention watermark.
CREATE INDEX spend_hourly_key ON spend_hourly (key_id, hour);
CREATE INDEX spend_hourly_user ON spend_hourly (user_id, hour);
CREATE INDEX spend_hourly_tenant ON spend_hourly (tenant_id, hour);

-- The ledger hours a report must cut, and the retention pass, find rows by start time.
CREATE INDEX billing_started ON billing_transactions (started_at);

-- Apply one statement's changed rows (its transition tables) to the rollups: new rows
-- count +1, old rows -1.
CREATE FUNCTION spend_hourly_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        WITH c AS (SELECT 1 AS sign, n.* FROM new_rows n),
        full_rollup AS (
            INSERT INTO spend_hourly AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.key_id, COALESCE(c.user_id, ''), COALESCE(c.tenant_id, ''), c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
            ON CONFLICT (hour, status, key_id, user_id, tenant_id, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated
            RETURNING 1)
        INSERT INTO spend_hourly_model AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (hour, status, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH c AS (SELECT 1 AS sign, n.* FROM new_rows n
                   UNION ALL SELECT -1 AS sign, o.* FROM old_rows o),
        full_rollup AS (
            INSERT INTO spend_hourly AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.key_id, COALESCE(c.user_id, ''), COALESCE(c.tenant_id, ''), c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
            ON CONFLICT (hour, status, key_id, user_id, tenant_id, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated
            RETURNING 1)
        INSERT INTO spend_hourly_model AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (hour, status, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated;
    ELSIF current_setting('tollgate.retention_pass', true) IS DISTINCT FROM 'on' THEN
        WITH c AS (SELECT -1 AS sign, o.* FROM old_rows o),
        full_rollup AS (
            INSERT INTO spend_hourly AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.key_id, COALESCE(c.user_id, ''), COALESCE(c.tenant_id, ''), c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
            ON CONFLICT (hour, status, key_id, user_id, tenant_id, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated
            RETURNING 1)
        INSERT INTO spend_hourly_model AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.upstream, c.model,
                   SUM(c.sign), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
                   SUM(CASE WHEN c.usage_source = 'estimated' THEN c.sign ELSE 0 END)
            FROM c WHERE c.status IN ('settled', 'released')
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (hour, status, upstream, model) DO UPDATE SET
                requests = r.requests + EXCLUDED.requests,
                input_tokens = r.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = r.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
                output_tokens = r.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = r.cost_micros + EXCLUDED.cost_micros,
                estimated = r.estimated + EXCLUDED.estimated;
    END IF;
    RETURN NULL;
END $$;

-- A statement trigger with transition tables names one event each.
CREATE TRIGGER spend_hourly_insert AFTER INSERT ON billing_transactions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION spend_hourly_apply();
CREATE TRIGGER spend_hourly_update AFTER UPDATE ON billing_transactions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION spend_hourly_apply();
CREATE TRIGGER spend_hourly_delete AFTER DELETE ON billing_transactions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION spend_hourly_apply();

-- Rows already in the ledger.
INSERT INTO spend_hourly
SELECT date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', status, key_id, COALESCE(user_id, ''), COALESCE(tenant_id, ''), upstream, model,
       COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros),
       SUM(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)
FROM billing_transactions WHERE status IN ('settled', 'released')
GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO spend_hourly_model
SELECT date_trunc('hour', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', status, upstream, model,
       COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros),
       SUM(CASE WHEN usage_source = 'estimated' THEN 1 ELSE 0 END)
FROM billing_transactions WHERE status IN ('settled', 'released')
GROUP BY 1, 2, 3, 4;

-- Every settled or released row that started before `retained_before` (seconds since the
-- epoch, a whole UTC hour) has been deleted by a retention pass, or will be by the pass
-- that set it, and is counted from the rollups. 0: nothing deleted yet.
INSERT INTO meta (name, value) VALUES ('retained_before', 0);
