"""`softprompt train|eval|generate|info|bank|inspect|serve|keys|compare`: the only place that prints.

Each verb parses flags (built from the config dataclasses), calls the library, and reports.
Every SoftPromptError becomes one clear `error: ...` line and exit status 2.

main.py      the parser (every command's flags, in one place) and `main`
common.py    flags and helpers the commands share (model and data flags, the Task the flags describe)
train.py     train
model.py     eval, generate, info
bank.py      bank list|show|rm|import|export, inspect
serve.py     serve, keys
compare.py   compare
"""

from softprompt.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
