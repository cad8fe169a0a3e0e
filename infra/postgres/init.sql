-- Runs once, when the postgres container initialises an empty data volume (/docker-entrypoint-initdb.d).
-- The database and role come from POSTGRES_DB / POSTGRES_USER; the schema is Alembic's job (the
-- scheduler's migrations), not this file's. Here: only server-side defaults the services rely on.
ALTER DATABASE turboserve SET timezone TO 'UTC';
-- A crashed client must not hold row locks (sessions' placement rows are updated under FOR UPDATE).
ALTER DATABASE turboserve SET idle_in_transaction_session_timeout TO '60s';
