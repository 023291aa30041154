-- tollgate shared-mode schema, version 4: re-rating. Same columns and meanings as the
-- embedded schema's version 8 (migrations/sqlite/0008_rerate.sql).

ALTER TABLE billing_transactions
    ADD COLUMN adjusts text,
    ADD COLUMN audio_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN audio_output_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN speed text,
    ADD COLUMN inference_geo text;
CREATE INDEX billing_adjusts ON billing_transactions (adjusts) WHERE adjusts IS NOT NULL;

-- The hourly rollups (version 3) count an adjustment row's money, never a request.
CREATE OR REPLACE FUNCTION spend_hourly_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        WITH c AS (SELECT 1 AS sign, n.* FROM new_rows n),
        full_rollup AS (
            INSERT INTO spend_hourly AS r
            SELECT date_trunc('hour', c.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', c.status, c.key_id, COALESCE(c.user_id, ''), COALESCE(c.tenant_id, ''), c.upstream, c.model,
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
                   SUM(CASE WHEN c.adjusts IS NULL THEN c.sign ELSE 0 END), SUM(c.sign * c.input_tokens), SUM(c.sign * c.cached_input_tokens), SUM(c.sign * c.cache_write_tokens), SUM(c.sign * c.output_tokens), SUM(c.sign * c.reasoning_tokens), SUM(c.sign * c.cost_micros),
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
