"""Watching the batch engine from tests."""

from ggsteer.generation import ContinuousBatch


def record_decoded_slots(monkeypatch) -> list[set[int]]:
    """A list that receives, for every llama_decode the batch engine makes, the set of slots its rows hold."""
    decoded_slots: list[set[int]] = []
    original = ContinuousBatch._decode

    def recording(self, rows):
        decoded_slots.append({row[0].slot for row in rows})
        original(self, rows)

    monkeypatch.setattr(ContinuousBatch, "_decode", recording)
    return decoded_slots
