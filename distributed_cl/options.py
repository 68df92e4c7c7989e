"""The base of every plug-in's options: a pydantic model that refuses unknown keys, a choice
checked against a registry, a union of option models told apart by one field, and the rendering
of pydantic's errors as one line naming the field (`loss.temperature: ...`).

Plug-ins (losses, optimizers, data formats, tasks, towers) declare their options with these,
beside their code; config.py composes them. This module imports nothing of the project."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Tag, ValidationError
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or has an impossible value."""


class Options(BaseModel):
    """A config section: typed fields, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def absolute_paths(self) -> Options:
        """This section with its local paths made absolute (workers chdir into their trial
        directory). Sections that hold paths override it; `resolve_paths` walks the sections."""
        return self


def absolute(path: str) -> str:
    """A local path made absolute; URIs (s3://, gs://, file://) unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def resolve_paths(options: Options) -> Options:
    """`options` and every section inside it with their local paths made absolute."""
    inner = {name: resolve_paths(value) for name, value in options if isinstance(value, Options)}
    return options.model_copy(update=inner).absolute_paths()


def join_path(base: str, *parts: str) -> str:
    """A path under `base`, a local directory or a URI (pathlib would fold s3:// into s3:/)."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error of a section's `field`, raised from a validator of the section (a cross-field rule,
    or a plug-in's own constructor check): rendered as `<section>.<field>: <message>`, or as
    `<section>.<message>` where the message starts with the field's name."""
    return PydanticCustomError("field", "{message}", {"field": field, "message": message})


def choice(registry: Mapping[str, Any] | Iterable[str], more: str = "") -> AfterValidator:
    """A str field whose value must be a name of `registry` (read when checked, so a registry that
    grows at run time, such as open_clip's model configs, is seen). `more`: what else is accepted."""

    def check(value: str) -> str:
        if value not in registry:
            message = f"must be one of {', '.join(registry)}{more}; got {value!r}"
            raise PydanticCustomError("choice", message.replace("{", "{{").replace("}", "}}"))
        return value

    return AfterValidator(check)


def tagged_union(registry: Mapping[str, type[Options]], field: str, default: str) -> Any:
    """The options of whichever registered plug-in `field` names (a missing `field` means
    `default`): a pydantic union discriminated by that field, built from the registry, so the
    error for an unknown name lists exactly the registered ones. (Tags are written `<name>`, so
    that the error rendering can drop them from the field's location.)"""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return f"<{value.get(field, default)}>"
        return f"<{getattr(value, field)}>" if isinstance(value, Options) else None

    members = tuple(Annotated[cls, Tag(f"<{name}>")] for name, cls in registry.items())
    return Annotated[Union[members], Discriminator(  # noqa: UP007 (a runtime tuple of members)
        tag, custom_error_type="tag", custom_error_message=f"{field} must be one of {', '.join(registry)}")]


def unknown_option(section: str, raw: Any, registry: Mapping[str, type[Options]], field: str, default: str) -> None:
    """A key of a tagged section that another plug-in takes (`loss.decoupled` with `loss.name:
    clip`): a ConfigError that says which ones take it, clearer than an unknown key."""
    if not isinstance(raw, dict) or raw.get(field, default) not in registry:
        return
    own = registry[raw.get(field, default)].model_fields
    for key in raw:
        users = [name for name, options in registry.items() if key in options.model_fields]
        if key not in own and users:
            raise ConfigError(f"{section}.{key} applies to {', '.join(users)}, not to {section}.{field}="
                              f"{raw.get(field, default)}")


def config_error(error: ValidationError, top: str = "config") -> ConfigError:
    """Pydantic's errors as one ConfigError, a line per error, each naming the field in the
    config's own dotted form (`loss.temperature: Input should be greater than 0`)."""
    return ConfigError("; ".join(_line(e, top) for e in error.errors(include_url=False)))


def _line(e: dict, top: str) -> str:
    where = ".".join(str(part) for part in e["loc"] if not str(part).startswith("<"))  # tags left out
    kind, ctx, value = e["type"], e.get("ctx", {}), e["input"]
    if kind == "extra_forbidden":
        return f"unknown config key {where}"
    if kind == "field":  # "temperature must be ..." reads on as "loss.temperature must be ..."
        field, message = ctx["field"], ctx["message"]
        name = ".".join(filter(None, [where, field]))
        if field and message.startswith((field + " ", field + "=")):
            return f"{name}{message[len(field):]}"
        return f"{name} {message}" if message.startswith("must ") else f"{name}: {message}"
    if kind in ("model_type", "model_attributes_type", "dict_type") or (kind == "tag" and not isinstance(value, dict)):
        return f"{where or top} must be a mapping, got {value!r}"
    if kind == "tag":  # "name must be one of ...": the union's field, and the value it had
        field = e["msg"].split()[0]
        return f"{where}.{e['msg']}; got {value.get(field)!r}"
    if kind in ("choice", "value_error"):  # a validator's message: "must be one of ..." or a sentence
        text = str(ctx["error"]) if kind == "value_error" else e["msg"]
        if not where:  # a rule of the whole config: its message names the fields
            return text
        return f"{where} {text}" if text.startswith("must ") else f"{where}: {text}"
    return f"{where or top}: {e['msg']}"


def parse(model: type[Options], raw: Any, top: str = "config") -> Any:
    """`model` validated from `raw`, or a ConfigError naming each bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, top) from None

