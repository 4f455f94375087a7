-- ALTER TABLE ... DROP COLUMN needs SQLite 3.35 or newer on the host.
DROP INDEX notes_author;
ALTER TABLE notes DROP COLUMN author;
