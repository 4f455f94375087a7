ALTER TABLE notes ADD COLUMN author TEXT NOT NULL DEFAULT 'unknown';
CREATE INDEX notes_author ON notes (author);
