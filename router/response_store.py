"""Stored responses, for `GET` and `DELETE /v1/responses/{id}` and for conversations continued with
`previous_response_id`: an LRU map in the router's memory, at most `--max-stored-responses`
entries (the least recently used goes first). A restart loses them, and router replicas do not
share them: a client continuing a conversation must reach the replica that answered it."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    response: dict        # the response object, as returned
    messages: list[dict]  # the whole conversation up to and with the reply, as chat messages


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        """Keeps `stored` (nothing when the capacity is 0), evicting the least recently used."""
        if self.capacity <= 0:
            return
        self._entries[stored.response["id"]] = stored
        self._entries.move_to_end(stored.response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
