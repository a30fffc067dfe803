"""The fleet gateway (`llmfleet-agent gateway`): one endpoint for every model on every GPU host."""
