"""softprompt as an lm-evaluation-harness model: a bank task's prompt (soft or deep) or the plain
frozen model, run in process through the engine's own scorer and decode loop, batched.

    softprompt-lm-eval --model softprompt --model_args bank=bank,task=sentiment --tasks TASK
    python -m softprompt.serving.lm_eval_model --model softprompt --model_args bank=bank,task=...

lm-eval 0.4.13 finds models in its own registry only (no plugin entry points), so the command
above is lm-eval's own CLI with this model registered first (importing this module does the same
for `lm_eval.simple_evaluate(model="softprompt", ...)`). It drives the serving engine, so it sits
in `serving/` (docs/architecture.md).

Model arguments: `bank` (a bank folder), `task` (a task in it; none = the plain model), `model`
(what `--model` of softprompt takes; default the embedded SmolLM2), `batch_size`, `max_gen_toks`.
Loglikelihoods are the scorer's sums (the numbers `softprompt eval` ranks), so a multiple-choice
task with the same template and label words gets the same accuracy; generations are the engine's
greedy (or sampled) text cut at the task's `until` strings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models first: a filled registry skips them)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from softprompt.model.loading import DEFAULT_MODEL, load_model
from softprompt.serving.engine import Engine, GenerationRequest

log = logging.getLogger(__name__)


@register_model("softprompt")
class SoftPromptLM(TemplateLM):
    """lm-eval's loglikelihood, loglikelihood_rolling and generate_until on a bank task."""

    def __init__(
        self,
        bank: str | None = None,
        task: str | None = None,
        model: str = DEFAULT_MODEL,
        batch_size: int | str = 32,
        max_gen_toks: int = 256,
        engine: Engine | None = None,
        **_ignored,
    ):
        super().__init__()
        self.engine = engine or Engine(load_model(model), bank)
        self.task = task or None
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = self.engine.tokenizer
        self.engine.score_batch_size = self.batch_size
        if self.task is not None:
            self.engine.activate(self.task)  # an unknown or unusable task fails here, not mid-run

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Real tokens that fit beside the task's virtual tokens."""
        virtual = self.engine.task_info(self.task).num_virtual_tokens if self.task else 0
        return self.engine.context_length - virtual

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        """Tokens as `softprompt eval` and the server make them (the tokenizer's special tokens)."""
        special = True if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=special)["input_ids"])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list:
        """(summed log-probability, greedy?) of each continuation after its context."""
        pairs = [self._fit(context, continuation) for _, context, continuation in requests]
        out = []
        # the scorer batches them (`batch_size` model rows a forward, grouped by length)
        for (_, target), scores in zip(
            pairs, self.engine.score_tokens(self.task, pairs, top_k=1), strict=True
        ):
            greedy = all(top[0][0] == t for top, t in zip(scores.top, target, strict=True))
            out.append((scores.total, greedy))
        return out

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fit (as lm-eval's HF model)."""
        room = max(1, self.max_length - len(continuation))
        return (context[-room:] or [self.eot_token_id]), continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(request.args[0], add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(score for score, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The engine's generation for each (context, gen_kwargs), cut at the `until` strings."""
        prepared = [self._generation(*request.args) for request in requests]
        out: list[str] = []
        for start in range(0, len(prepared), self.batch_size):
            results = self.engine.generate(prepared[start : start + self.batch_size])
            out += [result.text for result in results]
        return out

    def _generation(self, context: str, gen_kwargs: dict) -> GenerationRequest:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = self.tok_encode(context)[-max(1, self.max_length - new) :]
        return GenerationRequest(
            ids, task=self.task, max_new_tokens=new, temperature=temperature, stop=tuple(until)
        )


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with the `softprompt` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()


__all__ = ["SoftPromptLM", "main"]
