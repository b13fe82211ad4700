"""Training: one Trainer for prompt kinds, LoRA and full fine-tuning, and what surrounds it.

trainer.py     TrainConfig, Trainer, train_prompts (accelerate; bf16 autocast where it helps)
evaluation.py  classification accuracy, loss and generation metrics
lr_find.py     the learning-rate range test
sharding.py    splitting the examples between processes
trackers.py    --report-to: TensorBoard, trackio, MLflow, W&B
plots.py       PNG plots of loss, validation metric and prompt gradient norms
compare/       the same budget for each method (prompt, deep prompt, LoRA, full), measured
"""
