"""The vocabulary both sides of a run speak: the settings read from the user, the markers,
the typed messages that cross from worker to controller and back, the side channel they
travel on, the clock and the DSN helpers. It sits below everything else and imports
nothing of the plugin outside itself, so a worker can load it without the planner, the
server code or the reports."""
