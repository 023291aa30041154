-- tollgate embedded schema, version 8: re-rating (`tollgate rerate`, SPEC §4 "Price versions").
--
-- adjusts             NULL for a request's own row. On an adjustment row, the trace id of the
--                     settled row it re-rates: a `settled` row with zero tokens whose
--                     cost_micros is the difference between the current price and what the
--                     original (with its earlier adjustments) was billed — negative when the
--                     price went down. Its started_at is the original's, so it falls in the
--                     same windows and report periods; it counts in USD sums, never as a
--                     request.
-- audio_input_tokens, audio_output_tokens, speed, inference_geo
--                     the rest of what priced a row, so that it can be re-rated exactly.
--                     Rows settled before this version read 0 / NULL.

ALTER TABLE billing_transactions ADD COLUMN adjusts TEXT;
ALTER TABLE billing_transactions ADD COLUMN audio_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE billing_transactions ADD COLUMN audio_output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE billing_transactions ADD COLUMN speed TEXT;
ALTER TABLE billing_transactions ADD COLUMN inference_geo TEXT;
CREATE INDEX billing_adjusts ON billing_transactions (adjusts) WHERE adjusts IS NOT NULL;

-- The hourly rollups (version 7) count an adjustment row's money, never a request: their
-- triggers again, with the request count of a row being 1 only when `adjusts` is NULL.
DROP TRIGGER spend_hourly_insert;
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
        CASE WHEN NEW.adjusts IS NULL THEN 1 ELSE 0 END,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + excluded.requests,
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
        CASE WHEN NEW.adjusts IS NULL THEN 1 ELSE 0 END,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + excluded.requests,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
END;

DROP TRIGGER spend_hourly_update_old;
CREATE TRIGGER spend_hourly_update_old AFTER UPDATE ON billing_transactions
WHEN OLD.status IN ('settled', 'released')
BEGIN
    UPDATE spend_hourly SET
        requests = requests - (CASE WHEN OLD.adjusts IS NULL THEN 1 ELSE 0 END),
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND key_id = OLD.key_id AND user_id = COALESCE(OLD.user_id, '') AND tenant_id = COALESCE(OLD.tenant_id, '') AND upstream = OLD.upstream AND model = OLD.model;
    UPDATE spend_hourly_model SET
        requests = requests - (CASE WHEN OLD.adjusts IS NULL THEN 1 ELSE 0 END),
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND upstream = OLD.upstream AND model = OLD.model;
END;

DROP TRIGGER spend_hourly_update_new;
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
        CASE WHEN NEW.adjusts IS NULL THEN 1 ELSE 0 END,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + excluded.requests,
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
        CASE WHEN NEW.adjusts IS NULL THEN 1 ELSE 0 END,
        NEW.input_tokens,
        NEW.cached_input_tokens,
        NEW.cache_write_tokens,
        NEW.output_tokens,
        NEW.reasoning_tokens,
        NEW.cost_micros,
        CASE WHEN NEW.usage_source = 'estimated' THEN 1 ELSE 0 END)
    ON CONFLICT DO UPDATE SET
        requests = requests + excluded.requests,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        estimated = estimated + excluded.estimated;
END;

DROP TRIGGER spend_hourly_delete;
CREATE TRIGGER spend_hourly_delete AFTER DELETE ON billing_transactions
WHEN OLD.status IN ('settled', 'released')
    AND NOT EXISTS (SELECT 1 FROM meta WHERE name = 'retention_pass')
BEGIN
    UPDATE spend_hourly SET
        requests = requests - (CASE WHEN OLD.adjusts IS NULL THEN 1 ELSE 0 END),
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND key_id = OLD.key_id AND user_id = COALESCE(OLD.user_id, '') AND tenant_id = COALESCE(OLD.tenant_id, '') AND upstream = OLD.upstream AND model = OLD.model;
    UPDATE spend_hourly_model SET
        requests = requests - (CASE WHEN OLD.adjusts IS NULL THEN 1 ELSE 0 END),
        input_tokens = input_tokens - OLD.input_tokens,
        cached_input_tokens = cached_input_tokens - OLD.cached_input_tokens,
        cache_write_tokens = cache_write_tokens - OLD.cache_write_tokens,
        output_tokens = output_tokens - OLD.output_tokens,
        reasoning_tokens = reasoning_tokens - OLD.reasoning_tokens,
        cost_micros = cost_micros - OLD.cost_micros,
        estimated = estimated - CASE WHEN OLD.usage_source = 'estimated' THEN 1 ELSE 0 END
    WHERE hour = substr(OLD.started_at, 1, 13) || ':00:00.000000Z' AND status = OLD.status AND upstream = OLD.upstream AND model = OLD.model;
END;
