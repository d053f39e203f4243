import json

import pytest

ITEMS = [
    {"id": "p1", "prompt": "2 + 2 = ?", "completions": ["4 (good)", "5"]},
    {"id": "p2", "prompt": "Capital of France?", "completions": ["Lyon", "Paris (good)"]},
    {"id": "p3", "prompt": "Say hi", "completions": ["hi (good)", "bye"]},
    {"id": "r1", "prompt": "Order by size", "completions": ["large", "medium", "small"]},
    {"id": "r2", "prompt": "Order by speed", "completions": ["fast", "slow", "still"]},
]


@pytest.fixture
def candidates(tmp_path):
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return str(path)
