"""The operator's autoscaler: per-role signals from the engines' and router's metrics, pure
decisions (fast up, slow down, a prefill:decode policy), and the numbers behind each one.

Modules: ``config`` (the typed ``autoscaling`` spec), ``metrics`` (Prometheus text -> typed
samples), ``signals`` (samples -> one role's numbers over the last interval), ``decide`` (pure
decisions), ``cost`` (pod-deletion-cost), ``scrape`` (reading the pods), ``controller`` (one
pass: read, decide, record). docs/autoscaling.md explains each decision.
"""
