"""The PostgreSQL server as the controller sees it: how much room its limits leave
(arithmetic apart from the SQL that reads them: every SQL text is ``sql``'s), the
plugin's own connection and the first look through it, the monitor that watches the
run's backends, learning the room when nothing is configured, the logins a run uses, and
the room shared with other runs on the same server."""
