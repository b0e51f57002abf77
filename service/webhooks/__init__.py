"""The webhook dispatcher process (`strokes webhooks`): delivers the outbox's events, signed."""
