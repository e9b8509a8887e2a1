-- The least-privilege PostgreSQL role `shotsd run` connects as: it can do exactly what the
-- statements in sql/queries.sql and sql/audience.sql (and the schema check) need, no more.
--
-- Run it as a superuser, or as a role with CREATEROLE that owns (or holds the grant option
-- on) shotsd's tables and the host tables, in the application database, AFTER
-- `shotsd migrate` (the tables must exist):
--
--     psql -d app -v ON_ERROR_STOP=1 -f sql/roles.sql
--     psql -d app -v ON_ERROR_STOP=1 -c "SET shotsd.role = 'shotsd_eu'" -f sql/roles.sql
--
-- The second form picks another role name (default `shotsd`; the custom setting
-- shotsd.role, which also works from any client: `SET shotsd.role = '...'` before the
-- script). Do not add psql's -1: the script is one transaction already.
--
-- Idempotent and convergent: every run creates the role if missing, resets its attributes,
-- revokes everything it holds on these tables and grants the list below again, so extra
-- grants made by hand disappear. Re-run it after a shotsd upgrade whose migrations add
-- tables. It never sets a password: use `\password shotsd` in psql (or ALTER ROLE ...
-- PASSWORD from a file), peer authentication for a local server, or a client certificate;
-- the daemon reads the password from a systemd credential (systemd/shotsd.service).
--
-- Migrations are not run by this role (it cannot CREATE). Run `shotsd migrate` as the role
-- that owns shotsd's tables (the database owner, or a dedicated NOLOGIN owner role you
-- SET ROLE to), e.g. SHOTS_DATABASE_URL=postgresql://owner@host/app shotsd migrate ...;
-- the same owner then runs this script.
--
-- Host tables: the grants below are column-level and name the columns sql/audience.sql and
-- the shot_cycle statement use (the contacts' names and usernames stay unreadable). A
-- deployment that adapts sql/audience.sql to its own schema adapts the `grants` list too.

BEGIN;

DO $$
BEGIN  -- the role name, for the rest of this transaction
    PERFORM set_config('shotsd.role',
                       coalesce(nullif(current_setting('shotsd.role', true), ''), 'shotsd'),
                       true);
END
$$;

-- 1. The role: LOGIN and nothing else. CREATE ROLE can state the NO... attributes; ALTER
--    ROLE may touch SUPERUSER/REPLICATION/BYPASSRLS only as a superuser, so an existing
--    role is checked for them instead.
DO $$
DECLARE
    r text := current_setting('shotsd.role');
    attrs record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
        EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                       'NOREPLICATION NOBYPASSRLS INHERIT', r);
    ELSE
        SELECT rolsuper, rolreplication, rolbypassrls INTO attrs FROM pg_roles WHERE rolname = r;
        IF attrs.rolsuper OR attrs.rolreplication OR attrs.rolbypassrls THEN
            IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                RAISE EXCEPTION 'role % is SUPERUSER, REPLICATION or BYPASSRLS; only a '
                                'superuser can remove that: run this script as one', r;
            END IF;
            EXECUTE format('ALTER ROLE %I NOSUPERUSER NOREPLICATION NOBYPASSRLS', r);
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN NOCREATEDB NOCREATEROLE INHERIT', r);
    END IF;
    IF EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles u ON u.oid = m.member
               WHERE u.rolname = r) THEN
        RAISE WARNING 'role % is a member of other roles (%) and inherits their privileges; '
                      'least privilege wants none', r,
            (SELECT string_agg(g.rolname, ', ') FROM pg_auth_members m
             JOIN pg_roles u ON u.oid = m.member JOIN pg_roles g ON g.oid = m.roleid
             WHERE u.rolname = r);
    END IF;
END
$$;

-- 2. The grants. Tables are found through search_path, as the daemon finds them.
DO $$
DECLARE
    r text := current_setting('shotsd.role');
    -- table, privileges. Nothing may DELETE or TRUNCATE: shots are cancelled, not deleted,
    -- and recipients' rows are the record of who got what.
    grants text[][] := ARRAY[
        -- claim, lease renewal, progress, finish, release, stale reset (operators INSERT)
        ['shots_queue',             'SELECT, UPDATE'],
        -- audience INSERT ... SELECT, outcomes, reservations
        ['shots_sent',              'SELECT, INSERT, UPDATE'],
        -- one row per claim (INSERT ... ON CONFLICT DO UPDATE), finished by UPDATE
        ['shots_attempts',          'SELECT, INSERT, UPDATE'],
        -- the startup schema check
        ['shots_schema_migrations', 'SELECT'],
        -- audience selection reads these columns; shot_cycle writes chat_state
        ['telegram_contacts',
         'SELECT (bot_slug, telegram_id, chat_state, last_interaction_at), UPDATE (chat_state)'],
        ['funnel_events',           'SELECT (bot_slug, telegram_id, event_name)'],
        ['payment_transactions',    'SELECT (bot_slug, telegram_id, status)']
    ];
    t regclass;
    seq text;
    i int;
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
    FOR i IN 1 .. array_length(grants, 1) LOOP
        t := to_regclass(grants[i][1]);
        IF t IS NULL THEN
            RAISE EXCEPTION 'table % not found (search_path %): run `shotsd migrate` first, '
                            'and connect to the application database', grants[i][1],
                            current_setting('search_path');
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I',
                       (SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = t), r);
        -- REVOKE at table level also revokes every column-level privilege.
        EXECUTE format('REVOKE ALL ON TABLE %s FROM %I', t, r);
        EXECUTE format('GRANT %s ON TABLE %s TO %I', grants[i][2], t, r);
        -- The daemon inserts no row that draws from a sequence (shots_queue ids come from
        -- operators' INSERTs): no sequence privilege at all.
        FOR seq IN SELECT pg_get_serial_sequence(t::text, a.attname)
                   FROM pg_attribute a
                   WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped
                     AND pg_get_serial_sequence(t::text, a.attname) IS NOT NULL LOOP
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I', seq, r);
        END LOOP;
    END LOOP;
END
$$;

-- 3. Check the result, including what the role gets through PUBLIC or memberships, which
--    this script does not control.
DO $$
DECLARE
    r text := current_setting('shotsd.role');
    t text;
    p text;
    s text;
BEGIN
    FOREACH t IN ARRAY ARRAY['shots_queue', 'shots_sent', 'shots_attempts',
                             'shots_schema_migrations', 'telegram_contacts', 'funnel_events',
                             'payment_transactions'] LOOP
        FOREACH p IN ARRAY ARRAY['DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER'] LOOP
            IF has_table_privilege(r, to_regclass(t), p) THEN
                RAISE WARNING 'role % still has % on % (granted to PUBLIC or to a role it '
                              'belongs to): revoke it there', r, p, t;
            END IF;
        END LOOP;
    END LOOP;
    FOR s IN SELECT DISTINCT c.relnamespace::regnamespace::text FROM pg_class c
             WHERE c.oid IN (to_regclass('shots_queue'), to_regclass('telegram_contacts')) LOOP
        IF has_schema_privilege(r, s, 'CREATE') THEN
            -- PostgreSQL < 15 lets PUBLIC create in schema public.
            RAISE WARNING 'role % can CREATE in schema % (through PUBLIC?): '
                          'REVOKE CREATE ON SCHEMA % FROM PUBLIC', r, s, s;
        END IF;
    END LOOP;
    IF has_database_privilege(r, current_database(), 'CREATE') THEN
        RAISE WARNING 'role % can CREATE schemas in database %', r, current_database();
    END IF;
END
$$;

COMMIT;
