"""Requests' prompts as token ids: completion prompts (text or ids, one or a
list) and chat messages through the chat template. Runs off the event loop
(see ServerContext.off_loop).

A prompt far past the context length is refused after tokenizing only its
head: tokenizing a 4 MiB prompt costs seconds of CPU to learn what the first
few thousand characters already show."""

from __future__ import annotations

from typing import Any

from paged_attention.entrypoints.async_engine import PromptInput
from paged_attention.entrypoints.openai_protocol import ChatCompletionRequest, RequestError

# Tokenize at most this many characters per token of context before deciding
# a prompt is too long (English runs ~4 characters per token).
HEAD_CHARS_PER_TOKEN = 16


class PromptBuilder:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def count(self, prompt: str | list) -> int:
        """How many prompts a completion request's `prompt` holds (no tokenizing)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return 1
        return len(prompt)

    def completion_prompts(self, prompt: str | list, param: str = "prompt") -> list[PromptInput]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt must not be empty", param=param)
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                if not item:
                    raise RequestError("prompt is empty: give at least one character", param=param)
                prompts.append(PromptInput(self.encode(item, param), item))
            else:
                if not item:
                    raise RequestError("prompt token-id list is empty", param=param)
                prompts.append(PromptInput(list(item), None))
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> PromptInput:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "this model has no chat template: start the server with --chat-template FILE, "
                "or use /v1/completions",
                param="messages",
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own raise_exception, or a jinja error
            raise RequestError(
                f"the chat template rejected these messages: {err}", param="messages"
            ) from None
        # The template already holds any special tokens: do not add BOS again.
        return PromptInput(self.encode(text, "messages", add_special_tokens=False), text)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a 400 without tokenizing it all when its head
        alone is twice the context length (a margin no tokenizer's merges at
        the cut could close)."""
        head_chars = self.max_model_len * HEAD_CHARS_PER_TOKEN
        if len(text) > head_chars:
            head = self.tokenizer.encode(text[:head_chars], add_special_tokens=add_special_tokens)
            if len(head) >= 2 * self.max_model_len:
                raise RequestError(
                    f"the prompt is too long: its first {head_chars} of {len(text)} characters alone are "
                    f"{len(head)} tokens; max_model_len is {self.max_model_len}",
                    param=param,
                    code="context_length_exceeded",
                )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def text(self, prompt: PromptInput) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt.text
