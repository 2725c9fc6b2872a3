"""Model name -> task model, with a default per task. Built once at startup from the server config."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidInput, shown
from gateway.runtime import LoadedModel
from gateway.tasks.base import BatchedTask
from gateway.tasks.embedding import EmbeddingModel
from gateway.tasks.fill_mask import FillMaskModel
from gateway.tasks.token_classification import TokenClassificationModel
from gateway.tasks.translation import TranslationModel

if TYPE_CHECKING:
    from gateway.backends.triton import TritonPool

log = logging.getLogger(__name__)
TaskModel = TranslationModel | TokenClassificationModel | EmbeddingModel | FillMaskModel

# Which served task answers each rpc.
RPC_TASKS = {
    "Translate": "translation",
    "TranslateStream": "translation",
    "Classify": "token-classification",
    "Segment": "token-classification",
    "Embed": "embedding",
    "FillMask": "fill-mask",
}


@dataclass
class Served:
    name: str
    task: str
    loaded: LoadedModel
    model: BatchedTask[Any, Any]
    is_default: bool


class Registry:
    def __init__(self, served: Iterable[Served] = ()) -> None:
        self._by_name: dict[str, Served] = {}
        self._defaults: dict[str, str] = {}
        self.triton: TritonPool | None = None  # shared by the models with backend triton
        for entry in served:
            self.add(entry)

    def add(self, entry: Served) -> None:
        if entry.name in self._by_name:
            raise InvalidInput(f"model name {entry.name!r} is configured twice")
        self._by_name[entry.name] = entry
        if entry.is_default or entry.task not in self._defaults:
            self._defaults[entry.task] = entry.name

    def all(self) -> list[Served]:
        return list(self._by_name.values())

    def is_default(self, name: str) -> bool:
        entry = self._by_name[name]
        return self._defaults.get(entry.task) == name

    def resolve(self, task: str, name: str) -> Served:
        """The named model, or the task's default when `name` is empty; it must serve `task`."""
        if not name:
            if task not in self._defaults:
                raise InvalidInput(f"this server has no {task} model")
            name = self._defaults[task]
        entry = self._by_name.get(name)
        if entry is None:
            known = ", ".join(n for n, e in self._by_name.items() if e.task == task) or "none"
            raise InvalidInput(f"model: unknown model {shown(name)}; {task} models here: {known}")
        if entry.task != task:
            raise InvalidInput(f"model: {shown(name)} is a {entry.task} model, not a {task} model")
        return entry

    def label(self, rpc: str, request: Any) -> str:
        """The metrics label of a request's model: a served model's name (the one it names, or the default
        it will get), "-" when it names none, "unknown" when it names one not served here. Never the
        client's string itself, so that labels stay few whatever clients send."""
        name = str(getattr(request, "model", "") or "")
        if name:
            return name if name in self._by_name else "unknown"
        task = RPC_TASKS.get(rpc)
        return self._defaults.get(task, "-") if task is not None else "-"

    async def close(self) -> None:
        for entry in self._by_name.values():
            await entry.model.close()
            await entry.loaded.close()
        if self.triton is not None:
            await self.triton.close()
