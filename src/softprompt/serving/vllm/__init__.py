"""The vLLM backend: a light gateway (tokenizer, embeddings, bank) in front of a vLLM server.

backend.py   VLLMBackend: requests -> prompt embeddings -> vLLM's completions API
process.py   VLLMProcess: starting and stopping the vLLM server, finding its Python
"""
