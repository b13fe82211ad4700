"""Side-by-side comparison of tuning methods, measured on the user's own data.

Methods (all trained by the one `Trainer`, on the same examples, template, verbalizer, batch size,
step budget and seed; each on a fresh load of the base model, so none can contaminate another):

  zero_shot    no training: the template alone (reference row, accuracy only)
  prompt       soft prompt [n, d] before the input; the base stays frozen (checked bit for bit)
  deep_prompt  key/value prefix in every layer (P-tuning v2), through the KV-prefix machinery
  lora         `peft` LoRA on q_proj/v_proj; only the adapter trains
  full         every weight of the model trains

Measured: trainable parameters (counted, and checked against the count computed from shapes),
bytes per task (the files each method saves), peak RSS while training (a sampling thread; plus
CUDA peak on a GPU), seconds per step and examples/s, accuracy (rank classification), task
switch time (load a saved task from disk until it is usable). Computed: bytes to hold 100 tasks
in memory (base once + 100 task tensors; full fine-tuning: 100 model copies).


    config.py   CompareConfig (the budget every method shares), MethodRun
    run.py      run_compare: each (method, seed) on a fresh base, mean over seeds, outputs;
                merge_results: runs of one comparison made apart (processes, machines) as one
    methods.py  building each method (prompt, deep prompt, LoRA, full)
    measure.py  train, evaluate, save/switch, memory, frozen-base digest for one method
    report.py   markdown table and plot
"""

from softprompt.training.compare.config import METHODS, CompareConfig
from softprompt.training.compare.measure import model_digest
from softprompt.training.compare.methods import build_method
from softprompt.training.compare.report import markdown_table
from softprompt.training.compare.run import machine, merge_results, run_compare, write_outputs

__all__ = [
    "METHODS",
    "CompareConfig",
    "build_method",
    "machine",
    "markdown_table",
    "merge_results",
    "model_digest",
    "run_compare",
    "write_outputs",
]
