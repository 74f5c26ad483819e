"""What every server shares to be observed: structured logs with request ids (``logs``) and
OpenTelemetry traces carried across processes (``tracing``). Torch-free."""
