"""Schemathesis hooks for the API fuzz test (crates/sqlrs/tests/api_fuzz.rs)."""

import schemathesis


def _has_command_step(value):
    if isinstance(value, dict):
        if value.get("kind") == "command":
            return True
        return any(_has_command_step(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_command_step(v) for v in value)
    return False


@schemathesis.hook
def filter_body(ctx, body):
    """No request whose steps hold a `command` step (prepare, warmup, a lease's prepare). Such a
    step hands its command to the client and streams a heartbeat every 5 s until the client
    reports it done (up to 6 h): a generated request would wait that long, since the heartbeats
    keep its read timeout from firing. Its own tests (tools.rs) drive it with a real client."""
    return not _has_command_step(body)
