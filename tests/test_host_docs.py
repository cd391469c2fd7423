"""The runnable example in docs/host.md runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path


def test_docs_host_example_runs():
    src = (Path(__file__).resolve().parents[1] / "docs" / "host.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", src, re.S)
    assert blocks, "docs/host.md has no python example"
    exec(compile(blocks[0], "docs/host.md", "exec"), {})
