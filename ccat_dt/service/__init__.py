"""The filing service at a site: HTTP for instrument computers, a local journal while OpsDB is
out of reach, API tokens. `tokens` and `journal` are plain Python; only `app` imports FastAPI."""
