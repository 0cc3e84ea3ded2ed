"""The HTTP front: FastAPI app, OpenAI-compatible and vLLM-compatible routes. Talks only to the
service layer; errors are mapped in ``loraplex.server.api.errors``."""
