"""Client dialects lean speaks besides Chat Completions: each turns its own request into
lean's chat body (the OpenAI Chat Completions shape every provider adapter takes), with
no I/O. Import from the module of the dialect (`lean.dialects.anthropic`, ...)."""
