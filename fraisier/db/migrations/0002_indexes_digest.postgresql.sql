-- Version 2: the configuration digest and Pushgateway error of a run, and the query indexes.
ALTER TABLE runs ADD COLUMN config_digest TEXT;
ALTER TABLE runs ADD COLUMN push_error TEXT;
CREATE INDEX runs_pair_started ON runs (environment, fraise, started_at);
CREATE INDEX runs_started ON runs (started_at);
CREATE INDEX run_steps_name_started ON run_steps (name, started_at);
CREATE INDEX audit_events_run ON audit_events (run_id);
