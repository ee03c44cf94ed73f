"""The ASGI app: Stripe webhook receiver, the `/v1` API and health endpoints (SPEC §7)."""
