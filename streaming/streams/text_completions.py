"""The legacy text completions (`POST /v1/completions`): chat's lifecycle and relay, with `choices[].text`.

The stream is chat's but for its chunks (`object: text_completion`, the text in `choices[].text`: classified by
streaming/provider/endpoints.classify_text), so the relay differs only in the chunks Sluice writes itself.

A request may ask for several completions at once: one per prompt of an array, `n` (or `best_of`) of each. The request's
budget is for them all (`copies` × max_tokens, clamped like chat's), and the provider is sent each one's share; the
relay holds the whole stream to the budget. `max_tokens` defaults to 16, as OpenAI's does for this endpoint.
"""

import dataclasses

from streaming.provider.endpoints import TEXT_COMPLETIONS

from .completion import Completion
from .prompts import count_input
from .relay import Relay


class TextCompletion(Completion):
    endpoint = TEXT_COMPLETIONS

    async def _count_prompt(self) -> int:
        request = self.chat  # streaming.gateway.bodies.TextCompletionRequest
        prompt = await count_input(request.prompt)
        return prompt + (await count_input(request.suffix) if request.suffix else 0)

    def _prompt_sent(self):
        self.chat = dataclasses.replace(self.chat, prompt=None)  # frozen (Completion._prompt_sent)

    def _provider_body(self, target):
        request = self.chat
        body = {**request.options, "model": request.model, "prompt": request.prompt,
                "max_tokens": max(1, self.lease.max_tokens // request.copies)}
        if request.stream:
            # Usage always, to charge exactly; the relay strips it unless the client asked (as chat's).
            body["stream"] = True
            body["stream_options"] = {**(request.stream_options or {}), "include_usage": True}
        return body

    def _relay(self, events, **options) -> Relay:
        if self.chat.echo:
            # Each completion's text begins with its prompt, echoed: the ceiling makes room for it.
            options["max_tokens"] += self.lease.prompt_tokens * self.chat.copies
        return TextCompletionRelay(events, copies=self.chat.copies, **options)


class TextCompletionRelay(Relay):
    CHUNK_OBJECT = "text_completion"

    def __init__(self, events, *, copies=1, **options):
        super().__init__(events, **options)
        self.copies = copies

    def _overrun(self) -> bytes:
        choices = [{"text": "", "index": index, "logprobs": None, "finish_reason": "length"}
                   for index in range(self.copies)]
        return self._chunk_of_ours({"choices": choices}) + self._ending()
