"""The load bench of issue 5: lean, a minimal relay and `direct`, in one harness.

Every process is separate: the mock provider (`mock.py`), the target (lean, or the
reference relay in `relay.py`; none for `direct`), and the load generator
(`loadgen.py`; its HTTP and WebSocket clients in `clients.py` and `websocket.py`, the
client kinds in `wires.py`). The runner (`runner.py`) starts them per scenario
(`scenarios.py`) and target (`targets.py`), samples processes from /proc
(`sampler.py`), writes the table (`report.py`); `procs.py` pins and cleans up the
children, `tls.py` makes the mock's certificate.

Extending: a client kind is a class in `wires.py` (lean gets a row per `--wires`); a
scenario is a function in `scenarios.py`; a target is a class in `targets.py`.
"""
