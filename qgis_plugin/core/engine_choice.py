"""Which engine a prompt goes to, for the dock and the Processing algorithms alike: the
preferred one for its task, else the default model when the backend offers only that."""

from __future__ import annotations

from ..unigeoseg_protocol.operations import HelloReply
from ..unigeoseg_protocol.vocabulary import default_engine


def engine_for(hello: HelloReply | None, task: str) -> str:
    """``vocabulary.default_engine`` over the engines ``hello`` says are available (None, no
    hello yet: the preferred engine)."""
    offered = None if hello is None else [name for name, info in hello.engines.items()
                                          if info.available]
    return default_engine(task, offered)
