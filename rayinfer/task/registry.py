"""Finding plugins through entry points and collecting the tasks they register.

Built-in tasks come through the same ``rayinfer`` entry-point group as third-party ones.
Entry points load one by one: a plugin that fails to import is recorded with its error
(and named in "unknown task" messages) instead of taking the whole CLI down.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Iterable

import pluggy

from rayinfer import hookspecs
from rayinfer.errors import PluginError, UnknownTaskError
from rayinfer.task.base import Task

ENTRY_POINT_GROUP = "rayinfer"


ENV_LOAD_PLUGINS = "RAYINFER_LOAD_PLUGINS"
"""Comma-separated entry-point names to load; empty string loads none; unset loads all."""


log = logging.getLogger("rayinfer")


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    module: str
    tasks: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    tasks: dict[str, type[Task]]
    task_plugin: dict[str, str]
    plugins: list[PluginInfo]

    def get(self, name: str) -> type[Task]:
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            msg = f"unknown task {name!r}. Known tasks: {known}."
            broken = [p for p in self.plugins if p.error]
            if broken:
                msg += " Plugins that failed to load: " + "; ".join(f"{p.name} ({p.error})" for p in broken)
            raise UnknownTaskError(msg) from None

    def plugin_version(self, task: str) -> str | None:
        """The version of the distribution that provides ``task`` (None when not from one)."""
        name = self.task_plugin.get(task)
        return next((p.version for p in self.plugins if p.name == name), None)


def _selected(names: Iterable[str] | None) -> set[str] | None:
    if names is not None:
        return set(names)
    env = os.environ.get(ENV_LOAD_PLUGINS)
    if env is None:
        return None
    return {n.strip() for n in env.split(",") if n.strip()}


def load_registry(only: Iterable[str] | None = None) -> Registry:
    """Load plugins: all, or ``only`` the named entry points (else ``RAYINFER_LOAD_PLUGINS``)."""
    selected = _selected(only)
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    eps: list[EntryPoint] = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    seen: set[str] = set()
    for ep in eps:
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        if selected is not None and ep.name not in selected:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
            module=ep.value,
        )
        infos[ep.name] = info
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)  # a hook with the wrong arguments fails here (pluggy)
            _check_hooks(pm, plugin, ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            if pm.has_plugin(ep.name):  # registered, but its hooks are wrong: none of them runs
                pm.unregister(name=ep.name)
            # rayinfer's own verdict reads as it is; an exception from the plugin's code keeps its type
            info.error = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
            log.warning("rayinfer: warning: plugin %r failed to load: %s", ep.name, info.error)

    tasks: dict[str, type[Task]] = {}
    owner: dict[str, str] = {}
    for impl in pm.hook.register_tasks.get_hookimpls():
        pname = impl.plugin_name

        def register(task_cls: type, _pname: str = pname) -> None:
            _check_task_class(task_cls, _pname)
            name = task_cls.name  # type: ignore[attr-defined]
            if name in tasks:
                raise PluginError(
                    f"task {name!r} is registered twice: by plugin {owner[name]!r} and by plugin {_pname!r}. "
                    f"Uninstall one, or restrict plugins with {ENV_LOAD_PLUGINS}."
                )
            tasks[name] = task_cls  # type: ignore[assignment]
            owner[name] = _pname
            infos[_pname].tasks.append(name)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {pname!r} failed in register_tasks: {type(exc).__name__}: {exc}") from exc
    return Registry(tasks=tasks, task_plugin=owner, plugins=list(infos.values()))


def _check_hooks(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """A plugin's hooks must be rayinfer's: a misspelt one (``register_task``) would otherwise be
    dropped in silence, leaving a plugin with no tasks and no reason given. pluggy's
    ``check_pending`` finds it (every plugin registered before passed it, so it is this one's);
    the message names the nearest rayinfer hook."""
    import difflib

    callers = pm.get_hookcallers(plugin) or []
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        specs = [n for n in dir(hookspecs) if isinstance(getattr(pm.hook, n, None), pluggy.HookCaller)
                 and getattr(pm.hook, n).has_spec()]
        unknown = next(c.name for c in callers if not c.has_spec())
        near = difflib.get_close_matches(unknown, specs, n=1)
        raise PluginError(f"hook {unknown!r} is not a rayinfer hook"
                          + (f" (did you mean {near[0]!r}?)" if near else f" (rayinfer's hooks: {', '.join(specs)})"))
    if not callers:
        raise PluginError(f"module {getattr(plugin, '__name__', plugin)!r} implements no rayinfer hook: mark its "
                          "register_tasks function with @rayinfer.hookimpl")


def _check_task_class(task_cls: type, plugin: str) -> None:
    if not (inspect.isclass(task_cls) and issubclass(task_cls, Task)):
        raise PluginError(f"plugin {plugin!r} registered {task_cls!r}, which is not a rayinfer.Task subclass")
    if not isinstance(getattr(task_cls, "name", None), str) or not task_cls.name:
        raise PluginError(f"plugin {plugin!r}: task class {task_cls.__name__} has no `name`")
    if inspect.isabstract(task_cls):
        missing = ", ".join(sorted(task_cls.__abstractmethods__))
        raise PluginError(f"plugin {plugin!r}: task {task_cls.name!r} does not implement {missing}")
    if task_cls.requires is None and task_cls.load is Task.load:
        raise PluginError(
            f"plugin {plugin!r}: task {task_cls.name!r} neither declares `requires = ModelRequirement(...)` "
            "nor implements load(): it has no way to load a model"
        )
    undocumented = [n for n, f in task_cls.Options.model_fields.items() if not f.description]
    if undocumented:
        raise PluginError(
            f"plugin {plugin!r}: task {task_cls.name!r} options lack a description: {', '.join(undocumented)}"
        )
