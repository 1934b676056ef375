"""Live camera streams: sources decoded in threads of their own (sources.py), the loop that runs
their newest frames as batches (loop.py), the per-frame record (record.py), the running numbers
(stats.py) and the outputs: JSON lines and rolling shards (outputs.py), Rerun (rerun_sink.py).
`ps3edge stream` and `ps3edge.stream(...)` are its faces."""
