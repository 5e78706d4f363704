"""The one-pass, w-conditioned student: guidance embedding, distillation, loading a published bundle.

``from student import from_pretrained`` is resolved lazily, so importing the package stays cheap
(MindSpore is imported only when a bundle is loaded).
"""
from __future__ import annotations

from typing import Any

__all__ = ["from_pretrained"]


def __getattr__(name: str) -> Any:
    if name in ("from_pretrained", "Pretrained"):
        from student import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'student' has no attribute {name!r}")
