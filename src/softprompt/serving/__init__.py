"""Serving: tasks from the bank -> requests -> scheduler -> engine, or a vLLM server.

registry.py   the tasks the engine can run, loaded from the bank and kept in step with it
requests.py   a request's inputs checked and tokenised before it reaches the model
engine.py     Engine: mixed-task batches over one frozen model, a per-task KV prefix cache
scheduler.py  BatchScheduler: continuous batching, fairness between tasks, a bounded queue
backends.py   the interface the HTTP layer calls, and the built-in backend
vllm/         the gateway to a vLLM server (prompt embeddings over HTTP) and its process
"""
