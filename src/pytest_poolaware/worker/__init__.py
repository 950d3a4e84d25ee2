"""What runs inside each xdist worker: the agent that asks the controller for each test's
go, and the instrumentation that counts every connection at the driver (psycopg,
psycopg2, asyncpg, SQLAlchemy's pools, Django), gates new ones against the budget and
gives idle ones back. It never imports the planner, the server code or the reports, so
a worker pays only for what it measures."""
