"""The base model: Mistral-7B-Instruct-v0.3's facts and the tiny random-weight model for demos and tests."""
