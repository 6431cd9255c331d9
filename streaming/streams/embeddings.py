"""Embeddings (`POST /v1/embeddings`): a request whose whole cost is its input, through chat's lifecycle.

The counted input tokens are reserved at admission (no completion budget: nothing is generated), the provider's
answer is returned as it sent it, and settlement charges the provider's usage, capped like any non-streamed usage at
what the windows still allow (completion.Completion._chargeable).
"""

from streaming.provider.endpoints import EMBEDDINGS

from .completion import Completion
from .prompts import count_input


class Embeddings(Completion):
    endpoint = EMBEDDINGS

    async def _count_prompt(self) -> int:
        return await count_input(self.chat.input)  # chat: streaming.gateway.bodies.EmbeddingsRequest

    def _completion_budget(self, plan_max) -> int:
        return 0

    async def _lease_admission(self, prompt_tokens):
        """Lease the input's tokens, all of them or none."""
        lease = self.lease
        lease.prompt_tokens = prompt_tokens
        if prompt_tokens and await lease.top_up(prompt_tokens, "input") < prompt_tokens:
            refusal = lease.exhausted()
            await lease.release()
            raise refusal

    def _provider_body(self, target):
        return self.chat.body  # as the client sent it: Sluice reads the input, and changes nothing
