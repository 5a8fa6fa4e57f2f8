"""Whether a tool call's arguments fit its tool's JSON schema: the one check behind `/teach call`, data rows with
`tool_calls`, and the calls a model writes (a call that does not fit is never taught, trained or run).

A tool's `parameters` schema is checked with `jsonschema` (required fields, types, enums, ...); an argument the
schema does not name is refused too, unless the schema allows extra properties (`"additionalProperties"` set).
"""

from __future__ import annotations

from typing import Any

import jsonschema

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_parameters(name: str, tools: list[dict] | None) -> dict[str, Any] | None:
    """The `parameters` schema of the tool called `name` among `tools` (None: no such tool)."""
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and function.get("name") == name:
            parameters = function.get("parameters")
            return parameters if isinstance(parameters, dict) else NO_ARGUMENTS
    return None


def call_problem(name: str, arguments: Any, tools: list[dict] | None) -> str | None:
    """None if `arguments` fit the schema of tool `name`; else one line naming the tool and every problem.

    A tool missing from `tools` is not judged here (each caller already says so in its own words)."""
    schema = tool_parameters(name, tools)
    if schema is None:
        return None
    problems = _problems(schema, arguments)
    return f"{name} arguments do not fit its schema: {'; '.join(problems)}" if problems else None


def _problems(schema: dict[str, Any], arguments: Any) -> list[str]:
    if not isinstance(arguments, dict):
        return [f"the arguments must be a JSON object, not {type(arguments).__name__}"]
    problems = []
    if "additionalProperties" not in schema and isinstance(schema.get("properties"), dict):
        known = schema["properties"]
        problems += [f"unknown argument {key!r} (known: {', '.join(known) or 'none'})"
                     for key in arguments if key not in known]
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        validator.check_schema(schema)
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    except jsonschema.SchemaError as e:
        return [f"the tool's own schema is invalid ({e.message})"]
    except RecursionError:
        return ["the arguments are nested too deeply"]
    for error in errors:
        where = ".".join(str(p) for p in error.absolute_path)
        problems.append(f"{where}: {error.message}" if where else error.message)
    return problems
