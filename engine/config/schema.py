"""JSON Schema of the config files, generated from the models (checked in under schemas/)."""

from __future__ import annotations

import json

from engine.config.models import ConfigFile


def json_schema() -> dict:
    schema = ConfigFile.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
