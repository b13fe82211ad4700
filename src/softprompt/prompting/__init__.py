"""Prompting: how a prompt enters the frozen model, and the one scorer.

kind.py        PromptKind: the one interface a prompt kind implements (how it enters a forward
               pass, its parameters and init, its PEFT config, its default learning rate)
soft.py        PromptTuningConfig, initial values, the prompt table, and SoftPrompt (the soft
               kind: input embeddings)
prompted.py    PromptedModel: a frozen model with one prompt per task of one kind, mixed batches
deep.py        DeepPrompt (the deep kind: a per-layer key/value prefix, P-tuning v2) and
               DeepPromptModel (PromptedModel with that kind)
kinds.py       the kinds by name (KINDS, kind_named), the model for a saved prompt of any kind
inject.py      the injection seam: prompt embeddings / KV prefixes into a forward pass, the one
               sliding-window check, decoding
scorer.py      rank classification of rows (eval == validation == classify)
inspection.py  what a prompt is near: nearest vocabulary tokens, task similarity
"""
