"""How fast, measured side by side in one run: python -m bench.speed {encoder,llm,speed,read}."""
