"""A constrained reply of a reasoning model: think freely, then answer under the constraint.

The worker holds an output to its structured-output grammar from the first token, so a JSON
schema would leave a reasoning model no room to think. With `--reasoning-parser`, a request with
a constraint (`response_format`, `structured_outputs`, `required` or named tools), one prompt and
one choice runs in two requests on the scheduler, as one choice to the Run (router/run.py):

1. the thinking: the request without its constraint, until the model has written the parser's
   end tag (`</think>`, by its token ids); that request is then aborted, and the tokens it made
   after the tag are dropped;
2. the answer: the prompt followed by every token of the thinking, under the constraint, with
   `max_tokens` and `min_tokens` less what the thinking used (the prefix cache holds the prompt).

Where the model may answer without thinking (qwen3, with no block opened in the prompt), the
first tokens are held back until they either write the start tag (then it thinks) or do not (then
they are dropped and the answer starts from the prompt itself, under the constraint). A thinking
that ends otherwise (EOS, max_tokens) is the whole reply, with no answer.
"""
from __future__ import annotations

import grpc

from pagedserve.router.client import SchedulerClient
from pagedserve.router.errors import scheduler_unavailable
from pagedserve.router.generation import Generation
from pagedserve.router.replicas import ReplicaSet
from pagedserve.router.routing import Route
from pagedserve.v1 import scheduler_pb2 as pb

THINKING, ANSWER = 0, 1  # the two requests' indices in Generation's lists


class ThinkingFirst(Generation):
    """One prompt's choice as two scheduler requests (thinking, answer), shown as prompt 0."""

    def __init__(self, replicas: ReplicaSet | SchedulerClient, request: pb.GenerateRequest,
                 start_ids: list[int], end_ids: list[int], thinking: bool,
                 session: str | None = None):
        free = pb.GenerateRequest()
        free.CopyFrom(request)
        free.params.ClearField("structured_outputs")
        super().__init__(replicas, [free], session)
        self._constrained = request
        self._start_ids, self._end_ids = start_ids, end_ids
        self._phase = "thinking" if thinking else "undecided"
        self._generated: list[int] = []  # the thinking's tokens so far
        self._held: list[pb.GenerateResponse] = []  # undecided: what may be the start tag
        self._prompt_len = len(request.prompt_token_ids)

    def _take(self, entry):
        event = super()._take(entry)
        if event is None:
            return None
        index, message = event
        if index == ANSWER:
            # the answer's prompt holds the thinking too: only the real prompt can be cached
            message.cached_tokens = min(message.cached_tokens, self._prompt_len)
            return 0, message
        return self._thinking(message)

    def _thinking(self, message: pb.GenerateResponse):
        ids = list(message.token_ids)
        for k, token in enumerate(ids):
            self._generated.append(token)
            if self._phase == "undecided":
                if self._generated != self._start_ids[:len(self._generated)]:
                    return self._answer_now([])  # no start tag: the answer is the whole reply
                if len(self._generated) == len(self._start_ids):
                    self._phase = "thinking"
            elif self._generated[-len(self._end_ids):] == self._end_ids:
                return self._thinking_ended(message, k + 1)
        if self._phase == "undecided" and not message.finish_reason:
            self._held.append(message)  # still may be the start tag
            return None
        return 0, self._release(message)

    def _release(self, message: pb.GenerateResponse) -> pb.GenerateResponse:
        """The held messages and this one, as one."""
        if not self._held:
            return message
        merged = pb.GenerateResponse()
        merged.CopyFrom(self._held[0])
        for later in [*self._held[1:], message]:
            merged.token_ids.extend(later.token_ids)
            merged.logprobs.extend(later.logprobs)
            merged.finish_reason = later.finish_reason
        self._held.clear()
        return merged

    def _thinking_ended(self, message: pb.GenerateResponse, keep: int):
        """The end tag came with the `keep`-th token of `message`: the thinking stops there."""
        cut = pb.GenerateResponse()
        cut.CopyFrom(self._release(message))
        extra = len(message.token_ids) - keep  # tokens after the tag, in this message
        del cut.token_ids[len(cut.token_ids) - extra:]
        del cut.logprobs[len(cut.token_ids):]
        room = self._room()
        if room is not None and room <= 0:
            cut.finish_reason = pb.FINISH_REASON_LENGTH  # the thinking used every token
            self.finish(0)
            return 0, cut
        cut.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        self._answer_now(self._generated)
        return 0, cut

    def _room(self) -> int | None:
        params = self._constrained.params
        return params.max_tokens - len(self._generated) if params.HasField("max_tokens") else None

    def _answer_now(self, thinking: list[int]) -> None:
        """Stops the thinking request and starts the answer after `thinking` (token ids)."""
        self._held.clear()
        # The answer goes where the thinking ran: that replica's prefix cache holds the prompt.
        placed = self._placed.get(THINKING)
        if THINKING in self._open:
            self._stop(THINKING)
        if placed is None:  # the thinking's scheduler went away as it ended
            raise scheduler_unavailable(grpc.StatusCode.UNAVAILABLE.name)
        answer = pb.GenerateRequest()
        answer.CopyFrom(self._constrained)
        answer.request_id = f"{self._constrained.request_id}-answer"
        answer.prompt_token_ids.extend(thinking)
        params = answer.params
        params.ClearField("num_prompt_logprobs")  # the thinking's request returned them
        if params.HasField("max_tokens"):
            params.max_tokens -= len(thinking)
        if params.HasField("min_tokens"):
            params.min_tokens = max(0, params.min_tokens - len(thinking))
        self._phase = "answer"
        self._requests.append(answer)
        self._current.append(answer)
        self._outputs.append([])
        self._attempts.append(0)
        self._open.add(ANSWER)
        try:
            self._place(ANSWER, answer, *placed, Route(answer.prompt_token_ids, self._session))
        except RuntimeError:  # the scheduler's stream broke while the model thought
            self._open.discard(ANSWER)
            raise scheduler_unavailable(grpc.StatusCode.UNAVAILABLE.name) from None
        self._generated = list(thinking)

    def finish(self, prompt: int) -> None:
        """Stop strings ended the choice: whichever request runs stops."""
        for index in sorted(self._open):
            super().finish(index)


async def start_thinking_first(replicas: ReplicaSet | SchedulerClient,
                               request: pb.GenerateRequest, start_ids: list[int],
                               end_ids: list[int], thinking: bool,
                               session: str | None = None) -> ThinkingFirst:
    """Starts the thinking request of `request` (one prompt, n 1, with a constraint).
    `thinking`: the prompt opened the block (or the parser thinks first); else the model's first
    tokens decide. Raises APIError 503 if the scheduler is unreachable."""
    generation = ThinkingFirst(replicas, request, start_ids, end_ids, thinking, session)
    try:
        await generation.start()
    except BaseException:
        generation.close()
        raise
    return generation
