"""A stand-in for `ollama serve` for demos and tests: speaks Ollama's REST API, is not a model."""
