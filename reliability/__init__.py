"""culign's reliability suite: a live BentoML server on 127.0.0.1 with a copy of the registry, attacked with a
generated hostile corpus and property-based requests from its own OpenAPI schema, loaded, disconnected from,
and broken under (registry faults). ``make reliability`` runs it all; see docs/reliability.md."""
