"""Quick Machine Recovery server: incidents, approvals and signed directives for a fleet."""
