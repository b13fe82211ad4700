"""The HTTP layer: an OpenAI-compatible app over a serving backend.

app.py       create_app, serve: routes, limits, the proxy settings
schemas.py   request and response bodies
errors.py    SoftPromptError -> HTTP status and body, in one place
tenants.py   API keys, per-tenant quotas and the admin audit log
console.py   the web console at `/` (its page, scripts and styles live in static/)
"""
