"""What a run tells its user: the statistics gathered from the workers' records, the
terminal summary and its findings, marker advice, the JSON report, the SVG timeline and
the trace. It reads records only: never xdist, never the server."""
