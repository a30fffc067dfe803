"""The data plane: the authenticated, streaming proxy in front of the supervised Ollama."""
