"""Serving: tasks from the bank -> requests -> processor -> scheduler -> engine, or a vLLM server.

registry.py   the tasks the engine can run, loaded from the bank and kept in step with it
requests.py   the requests, their results and the prepared pieces between them
processor.py  InputProcessor: a request checked, tokenised, given its task; no model (both backends)
engine.py     Engine: the processor plus the model runner: mixed-task batches, a KV prefix cache
scheduler.py  BatchScheduler: continuous batching, fairness between tasks, a bounded queue
backends.py   the interface the HTTP layer calls, and the built-in backend
vllm/         the gateway to a vLLM server (prompt embeddings over HTTP) and its process
"""
