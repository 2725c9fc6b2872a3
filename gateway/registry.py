"""Model name -> task model, with a default per task. Built once at startup from the server config."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InvalidInput, UnknownModel, shown
from gateway.metrics import label_request
from gateway.tasks.embedding import EmbeddingModel
from gateway.tasks.fill_mask import FillMaskModel
from gateway.tasks.token_classification import TokenClassificationModel
from gateway.tasks.translation import TranslationModel

log = logging.getLogger(__name__)
TaskModel = TranslationModel | TokenClassificationModel | EmbeddingModel | FillMaskModel
UNKNOWN = "unknown"  # the metrics label of requests naming a model this server does not serve


@dataclass(frozen=True)
class Served:
    name: str
    model: TaskModel
    is_default: bool = False

    @property
    def task(self) -> str:
        return self.model.task


class Registry:
    def __init__(self, served: Iterable[Served] = ()) -> None:
        self._by_name: dict[str, Served] = {}
        self._defaults: dict[str, str] = {}
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
        """The named model, or the task's default when `name` is empty; it must serve `task`. Labels the
        request's metrics with the model's name (never with a client's string: "unknown" when it names
        none served here)."""
        if not name:
            if task not in self._defaults:
                raise InvalidInput(f"this server has no {task} model")
            name = self._defaults[task]
        entry = self._by_name.get(name)
        if entry is None:
            label_request(UNKNOWN)
            known = ", ".join(n for n, e in self._by_name.items() if e.task == task) or "none"
            raise UnknownModel(f"model: unknown model {shown(name)}; {task} models here: {known}")
        label_request(entry.name)
        if entry.task != task:
            raise InvalidInput(f"model: {shown(name)} is a {entry.task} model, not a {task} model")
        return entry

    async def start(self) -> None:
        for entry in self._by_name.values():
            await entry.model.start()

    async def close(self) -> None:
        for entry in self._by_name.values():
            await entry.model.close()
