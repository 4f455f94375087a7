-- A broken migration, shipped to show a failed migration step: the first statement succeeds,
-- the second names a column that does not exist, so the whole transaction is rolled back.
ALTER TABLE notes ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
CREATE INDEX notes_pinned ON notes (pinned_at);
