-- tollgate embedded schema, version 6: the journal drives the counters.
--
-- journal_meta        named values kept with the journal: `instance_id`, this journal's
--                     durable instance identity, generated once (SPEC §7: recovery takes
--                     every open row of the journal, whatever instance id it carries).
-- applied_at          when a settle or release event was applied to the shared counters
--                     (Redis). A reserve is applied before it is journaled (the quota check
--                     decides first), so it is written applied. Events with no applied_at are
--                     replayed, idempotently per trace id, by the applier
--                     (`shared::applier`); compaction keeps them until then.
--
-- Events written before this version count as applied: their counter changes went through
-- the request path (or the in-memory replay queue of earlier versions).

CREATE TABLE journal_meta (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

ALTER TABLE journal_events ADD COLUMN applied_at TEXT;
UPDATE journal_events SET applied_at = created_at;
CREATE INDEX journal_unapplied ON journal_events (seq) WHERE applied_at IS NULL;

-- Recovery reads every open trace, not one instance id's.
DROP INDEX journal_traces_open;
CREATE INDEX journal_traces_open ON journal_traces (status) WHERE status = 'reserved';
