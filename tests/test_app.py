"""The demo module imports and builds its page without a model."""

import app


def test_demo_builds_and_shows_the_disclaimer():
    demo = app.build_demo()
    texts = [block.value for block in demo.blocks.values() if hasattr(block, "value") and isinstance(block.value, str)]
    assert any("never diagnoses" in t for t in texts)
