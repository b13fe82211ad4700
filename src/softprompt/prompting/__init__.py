"""Prompting: how a prompt enters the frozen model, and the one scorer.

soft.py        PromptTuningConfig and the soft prompt table [tasks, n, d] (input embeddings)
deep.py        DeepPromptModel: a per-layer key/value prefix (P-tuning v2)
prompted.py    PromptedModel: a frozen model with one soft prompt per task, mixed-task batches
inject.py      the injection seam: prompt embeddings / KV prefixes into a forward pass, decoding
scorer.py      rank classification of rows (eval == validation == classify)
inspection.py  what a prompt is near: nearest vocabulary tokens, task similarity
"""
