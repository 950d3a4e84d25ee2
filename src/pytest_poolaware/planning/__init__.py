"""The pure planning core: which worker runs which test (placement), how many
connections each may open and when (admission), the fan-out's shape, the run's lower
bound and what earlier runs taught (history). Decisions only: no xdist, no database, no
clock of its own, so every rule here is unit- and property-tested without a process."""
